"""One Ray task per shard, a bounded number in flight: how every per-shard job in vitpipe runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import ray

from pipeline.metrics import Progress
from pipeline.ray_session import cluster_cpus


class CountsSamples(Protocol):
    samples: int


ResultT = TypeVar("ResultT", bound=CountsSamples)


def run_shard_tasks(
    task: Callable[..., ResultT],
    shard_args: Sequence[tuple[Any, ...]],
    *,
    label: str,
    shared: tuple[Any, ...] = (),
    max_in_flight: int | None = None,
) -> list[ResultT]:
    """Run `task(*shared, *args)` as one Ray task per shard; results in shard order.

    At most `max_in_flight` tasks (default: two per cluster CPU) are submitted at once, so the
    driver's memory stays bounded however many shards there are, and adding nodes adds throughput
    with no change here.
    """
    # SPREAD: shards go to every node (Ray's default packs short tasks onto the first node's workers:
    # a two-node test cluster ran all five shards of a small dataset on one node).
    remote = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(_on_node)
    limit = max_in_flight or 2 * cluster_cpus()
    progress = Progress(label, total=len(shard_args))
    pending: dict[ray.ObjectRef, int] = {}
    results: list[ResultT | None] = [None] * len(shard_args)
    nodes: set[str] = set()
    next_index = 0
    while next_index < len(shard_args) or pending:
        while next_index < len(shard_args) and len(pending) < limit:
            # `shared` goes by value: small arguments travel inside the task spec. A `ray.put` of them
            # failed on a reused two-node cluster with a spurious OwnerDiedError (driver alive).
            pending[remote.remote(task, *shared, *shard_args[next_index])] = next_index
            next_index += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            node, result = ray.get(ref)
            results[pending.pop(ref)] = result
            nodes.add(node)
            progress.nodes = len(nodes)
            progress.update(items=result.samples)
    return [result for result in results if result is not None]


def _on_node(task: Callable[..., ResultT], *args: Any) -> tuple[str, ResultT]:
    """Run one shard's task; returns the node it ran on beside its result."""
    return ray.get_runtime_context().get_node_id(), task(*args)
