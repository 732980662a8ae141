"""The workers' side of the probes (`pretrain.eval`): at a probe step every rank hands its part of the
weights (raw, and EMA when kept) to rank 0, which submits the full fp32 state to the run's Prober actor
(`pipeline.pretrain.probes`) and records each result as it comes back. Training waits for the hand-over
only (a copy and a gather), never for a probe: results are collected at later steps without waiting, and
once at the end of the launch, with waiting, so that none is lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
import torch.distributed as dist

from pipeline.console import say
from pipeline.metrics import MetricsLog, probe_line, probe_records, read_records
from pipeline.pretrain.plan import PretrainPlan
from vit.fragments import Fragments, gather_full
from vit.recipe import BatchSplit

# Probes of one kind in flight at most: a probe step that finds them all still running is skipped (and
# said), so that a prober slower than the probe cadence never holds more weights than this in memory.
MAX_PENDING = 2
T = TypeVar("T")
Backbone = Callable[[], "str | None"]  # rank 0's digest of the engine's in-memory weights at a probe step


@dataclass(frozen=True)
class ProbeCadence:
    """When to probe: every `every` steps and at the run's last step; `images_per_step` turns a step into
    images seen (the global batch)."""

    every: int
    total_steps: int
    images_per_step: int
    key: str  # the probes' key: a probe recorded under another (other targets or shots) is not theirs

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps


def probe_cadence(plan: PretrainPlan, batch: BatchSplit) -> ProbeCadence | None:
    """When the run's probes fall (None without pretrain.eval)."""
    if plan.probes is None:
        return None
    return ProbeCadence(plan.probes.every, plan.total_steps, batch.global_batch, plan.probes.key)


class ProbeClient:
    """Every rank makes one; rank 0's (`log` given) submits and records. `prober` is None when the run
    has no probes (then every call does nothing)."""

    def __init__(
        self,
        prober: Any,
        cadence: ProbeCadence | None,
        shapes: dict[str, Any],
        log: MetricsLog | None,
        group: Any = None,
    ) -> None:
        self.prober, self.cadence, self.shapes, self.log = prober, cadence, shapes, log
        self.group = group  # the process group objects travel in (vit.device.object_group)
        self.pending: deque[tuple[str, int, ray.ObjectRef, str | None]] = deque()

    def due(self, step: int) -> bool:
        """Whether `step` is a probe step (every rank answers alike)."""
        return self.prober is not None and self.cadence is not None and self.cadence.due(step)

    def submit(self, step: int, weights: dict[str, Fragments], backbone: Backbone | None = None) -> None:
        """Hand each kind of weights (`{"raw": ..., "ema": ...}`) over to the prober (a collective: every
        rank calls it at a probe step); skipped, said and recorded while earlier probes still run, except
        at the run's last step, which is always handed over (the end of the launch waits for it). The raw
        probe's record carries what `backbone` answers on rank 0 (the engine's own digest of the weights)."""
        last = self.cadence is not None and step == self.cadence.total_steps
        self.collect(wait=False)
        if not last and from_rank_zero(self._busy() if self.log is not None else False, self.group):
            if self.log is not None:
                self.log.event("probe_skipped", step=step, pending=len(self.pending))
                say(
                    f"pretrain: probe at step {step:,} skipped: {len(self.pending)} earlier probes still run "
                    "(raise pretrain.eval.every, or pretrain.eval.cpus/gpus)",
                    err=True,
                )
            return
        digest = backbone() if backbone is not None and self.log is not None and "raw" in weights else None
        for kind, fragments in weights.items():
            self._submit(
                step, kind, gather_full(fragments, self.shapes, self.group), digest if kind == "raw" else None
            )

    def resume(
        self, step: int, weights: dict[str, Fragments], run_dir: str, backbone: Backbone | None = None
    ) -> None:
        """A relaunch that starts at a probe step probes each kind of weights the stopped launch left
        unrecorded there (its probe was running when that launch ended), or recorded under other probes
        (a finished run relaunched with other targets or shots, whose best then needs a probe of these):
        the history misses no probe step (a collective: every rank calls it as the launch starts)."""
        if step == 0 or not self.due(step):
            return
        missing: list[str] = []
        if self.log is not None and self.cadence is not None:
            missing = unprobed(read_records(run_dir), step, list(weights), self.cadence.key)
        missing = from_rank_zero(missing, self.group)
        if missing:
            self.submit(step, {kind: weights[kind] for kind in missing}, backbone)

    def _busy(self) -> bool:
        kinds = [kind for kind, *_ in self.pending]
        return any(kinds.count(kind) >= MAX_PENDING for kind in set(kinds))

    def _submit(self, step: int, kind: str, state: dict[str, Any] | None, digest: str | None) -> None:
        if self.log is None or state is None:
            return
        images = step * self.cadence.images_per_step if self.cadence else 0
        self.pending.append((kind, step, self.prober.probe.remote(step, images, kind, state), digest))

    def collect(self, *, wait: bool) -> None:
        """Record the probes that have finished, in the order they were submitted; with `wait`, every one
        (the end of a launch). A probe that failed is said and recorded as an event; training goes on."""
        if self.log is None:
            return
        while self.pending:
            ready, _ = ray.wait([self.pending[0][2]], timeout=None if wait else 0)
            if not ready:
                return
            self._collect_one()

    def _collect_one(self) -> None:
        """Wait for the oldest probe in flight and record it."""
        kind, step, ref, digest = self.pending.popleft()
        try:
            record = ray.get(ref) | ({"backbone": digest} if digest is not None else {})
        except (ray.exceptions.RayError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            self.log.event("probe_failed", step=step, probe=kind, error=reason)
            say(f"pretrain: the {kind} probe of step {step:,} failed: {reason}", err=True)
            return
        self.log.write(record, section=f"probe_{kind}")
        say(f"pretrain: {probe_line(record)}")


def unprobed(records: list[dict[str, Any]], step: int, kinds: list[str], key: str) -> list[str]:
    """The kinds of weights with no probe result at `step` under the probes' `key` in a run's records."""
    recorded = {(r["probe"], r["step"]) for r in probe_records(records) if r.get("probe_key") == key}
    return [kind for kind in kinds if (kind, step) not in recorded]


def from_rank_zero(value: T, group: Any = None) -> T:
    """Rank 0's answer on every rank (only rank 0 knows what is in flight, and what was recorded)."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=group)
    return holder[0]
