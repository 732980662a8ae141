"""The pretraining slots of a study run: a named actor that lets as many points pretrain at once as the
cluster holds whole pretraining runs; the others wait for a slot (their fine-tuning needs none)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from pipeline.config import PretrainConfig, digest
from pipeline.console import say
from pipeline.pretrain.plan import run_needs, worker_group


@ray.remote(num_cpus=0)
class PretrainSlots:
    """A semaphore of pretraining slots shared by one run's points (a named actor)."""

    def __init__(self, slots: int) -> None:
        self.semaphore = asyncio.Semaphore(slots)

    async def acquire(self) -> None:
        await self.semaphore.acquire()

    async def release(self) -> None:
        self.semaphore.release()


def point_needs(config: PretrainConfig) -> dict[str, float]:
    """What one point's pretraining takes of the cluster: its worker group, and its probes' actor."""
    probes = {"CPU": config.eval.cpus, "GPU": config.eval.gpus} if config.eval is not None else None
    return run_needs(worker_group(config), probes)


def pretrain_slots(needs: dict[str, float], run: str) -> Any:
    """The run's slots actor, created by the first point submitted with as many slots as the cluster
    holds whole pretraining runs taking `needs` (at least one: check_resources refuses a run that never
    fits)."""
    have = ray.cluster_resources()
    slots = max(1, int(min(have.get(key, 0.0) // need for key, need in needs.items())))
    key = f"{ray.get_runtime_context().get_job_id()}-{digest(run)}"
    if key not in _SLOTS:  # the driver holds the handle for its lifetime: Ray ends an actor nobody holds
        _SLOTS[key] = PretrainSlots.options(name=f"vitpipe-study-slots-{key}").remote(slots)
        wants = ", ".join(f"{need:g} {name}" for name, need in needs.items())
        say(f"study: {slots} point(s) pretrain at once on this cluster (each {wants})", err=True)
    return _SLOTS[key]


_SLOTS: dict[str, Any] = {}
