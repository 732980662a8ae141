"""Pretraining that follows the cluster: what the workers watch for between steps, and what the driver
waits for when the cluster cannot hold the run's smallest group.

Ray Train sizes an elastic group (`num_workers: [min, max]`) when it starts or restarts it: as many
workers as the cluster can place, up to max; a lost node restarts the group on what is left, from the
newest checkpoint. vitpipe adds three things around that:
- a node's preemption notice (a drain: a spot reclaim, a pod's preStop hook) checkpoints the step at once
  and, when the notice has a deadline, once more just before it, so the restart that follows the node's
  loss resumes there;
- room for more workers, seen by rank 0, checkpoints and ends the group ("regroup"): the driver starts it
  again and Ray Train places the larger group; so a group grows at a checkpoint and loses no step;
- a cluster that cannot place `min` workers for `elastic_wait_s` fails the run, naming min and what the
  cluster has (Ray Train itself would wait for ever).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.collective

from pipeline.console import say
from pipeline.pretrain.control import ABORT_WAIT_S
from pipeline.pretrain.plan import WorkerGroup, placeable

if TYPE_CHECKING:
    from vit.loop import Notice

CLUSTER_POLL_SECONDS = 2.0  # how often the driver looks at the cluster while an elastic group runs
LAST_CALL_MARGIN_S = 5.0  # a preempted node's last checkpoint starts at least this long before it goes


def alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


# ---------------------------------------------------------------- the workers' notices


@dataclass
class Notices:
    """Every rank's `notice` hook (vit.loop.Hooks). Each `every` steps all ranks ask Ray Train together
    whether a node of the group is being preempted: a checkpoint at once, and with a deadline a last one
    just before it (so that only the steps after it are trained again); a group below its max (elastic)
    then asks rank 0 whether the cluster has room for another worker on nodes it has not tried to grow onto
    yet (a checkpoint and a regroup). Every rank returns the same answer: what one rank decides alone is
    broadcast from rank 0."""

    every: int
    rank: int
    world: int
    bounds: WorkerGroup
    control: Any  # the launch's RunControl actor: remembers the node sets a regroup was tried on
    log: Any = None  # rank 0's MetricsLog
    noticed: set[str] = field(default_factory=set)
    deadline: float | None = None  # when the noticed node goes (epoch seconds), until its last checkpoint
    polled: float = field(default_factory=time.monotonic)  # rank 0's time of the previous poll
    poll_gap: float = 0.0  # the longest time between two polls since the notice (steps and its checkpoint)

    def __call__(self, step: int) -> Notice:
        if step % self.every:
            return ""
        now = time.monotonic()
        self.poll_gap, self.polled = max(self.poll_gap, now - self.polled), now
        if self._preempted(step) or self._last_call(step):
            return "checkpoint"
        if self.world < self.bounds.max_workers and self._room(step):
            return "regroup"
        return ""

    def _preempted(self, step: int) -> bool:
        info = ray.train.get_preemption_info()  # rank 0's view, the same on every rank
        if info is None or set(info.preempted_node_ids) <= self.noticed:
            return False
        self.noticed |= set(info.preempted_node_ids)
        self.deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        self.poll_gap = 0.0  # measured afresh from here: the next poll's gap holds this checkpoint
        if self.log is not None:
            left = self.deadline - time.time() if self.deadline is not None else None
            self.log.event(
                "preemption",
                step=step,
                nodes=info.preempted_node_ids,
                ranks=info.preempted_ranks,
                deadline_s=round(left, 1) if left is not None else None,
            )
            say(
                f"pretrain: preemption notice for rank(s) {info.preempted_ranks}"
                + (f", {left:,.0f} s before the node goes" if left is not None else "")
                + f": checkpointing step {step}; the group carries on until the node goes"
            )
        return True

    def _last_call(self, step: int) -> bool:
        """Once the node's deadline is nearer than two polls (each holding a checkpoint) and a margin, the
        step is checkpointed once more: a restart after the node goes loses only the steps after it."""
        if self.deadline is None:
            return False
        due = self.rank == 0 and self.deadline - time.time() < 2 * self.poll_gap + LAST_CALL_MARGIN_S
        due = bool(ray.train.collective.broadcast_from_rank_zero(due))
        if due:
            self.deadline = None
            if self.log is not None:
                self.log.event("last_checkpoint", step=step)
                say(f"pretrain: the preempted node goes soon: checkpointing step {step} once more")
        return due

    def _room(self, step: int) -> bool:
        grow = self._rank0_sees_room(step) if self.rank == 0 else None
        return bool(ray.train.collective.broadcast_from_rank_zero(grow))

    def _rank0_sees_room(self, step: int) -> bool:
        nodes = alive_nodes()
        free = placeable(self.bounds, [ray.available_resources()])
        if free < 1:
            return False
        node_set = sorted(node["NodeID"] for node in nodes)
        if not ray.get(self.control.try_regroup.remote(node_set)):
            return False  # a regroup was tried on these very nodes already: wait for the cluster to change
        if self.log is not None:
            self.log.event("room", step=step, workers=self.world, free_workers=free)
        say(
            f"pretrain: the cluster has room for {free} more worker(s): checkpointing step {step} and "
            f"regrouping ({self.world} -> up to {self.bounds.max_workers} workers)"
        )
        return True


# ---------------------------------------------------------------- the driver's wait for min


class MinimumWatch:
    """The driver's check, every CLUSTER_POLL_SECONDS while an elastic run is launched: the cluster's live
    nodes can hold `min_workers` (by their total resources). Below that for `wait_s` seconds in a row,
    it aborts the group and raises, naming min and the resources seen."""

    def __init__(self, bounds: WorkerGroup, wait_s: float, control: Any) -> None:
        self.bounds, self.wait_s, self.control = bounds, wait_s, control
        self.below_since: float | None = None
        self.checked = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.checked < CLUSTER_POLL_SECONDS:
            return
        self.checked = now
        nodes = [node["Resources"] for node in alive_nodes()]
        fits = placeable(self.bounds, nodes)
        if fits >= self.bounds.min_workers:
            if self.below_since is not None:
                say(f"pretrain: the cluster can place {fits} worker(s) again", err=True)
            self.below_since = None
            return
        if self.below_since is None:
            self.below_since = now
            say(
                f"pretrain: waiting for the cluster to place at least {self.bounds.min_workers} worker(s) "
                f"({describe_cluster(self.bounds, nodes)}); giving up after {self.wait_s:,.0f} s",
                err=True,
            )
        if now - self.below_since >= self.wait_s:
            ray.wait([self.control.abort_group.remote()], timeout=ABORT_WAIT_S + 10)
            raise GroupBelowMinimumError(
                f"pretrain: the cluster could not place the run's minimum of {self.bounds.min_workers} "
                f"worker(s) for {self.wait_s:,.0f} s (elastic_wait_s): "
                f"{describe_cluster(self.bounds, nodes)}. "
                "Add nodes, or lower num_workers' min or cpus_per_worker; the newest checkpoint is kept and "
                "the same command continues from it"
            )


class GroupBelowMinimumError(RuntimeError):
    """An elastic run's cluster could not hold its smallest group for `elastic_wait_s`."""


def describe_cluster(bounds: WorkerGroup, nodes: list[dict[str, float]]) -> str:
    """`the cluster has 1 CPU, 0 GPU on 1 live node(s): room for 1 worker(s) of 1 CPU`."""
    totals = {key: sum(node.get(key, 0.0) for node in nodes) for key in bounds.per_worker}
    have = ", ".join(f"{value:g} {key}" for key, value in totals.items())
    wants = ", ".join(f"{need:g} {key}" for key, need in bounds.per_worker.items())
    return (
        f"the cluster has {have} on {len(nodes)} live node(s): room for {placeable(bounds, nodes)} "
        f"worker(s) of {wants}"
    )
