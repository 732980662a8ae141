"""A clean stop for a pretraining launch: the driver's first SIGINT or SIGTERM (Ctrl-C, a pod eviction,
a spot notice) asks the workers, through a small Ray actor, to train on to the next log step (where they
read the device and agree on a stop), checkpoint it and return; a second signal stops at once. The same
actor carries back how the workers' loop ended (finished, stopped, diverged), which the driver turns into
its exit and message.

Ray Train's own SIGINT handler aborts the run without a checkpoint; it is installed only when `fit()`
runs on the main thread, so `fit()` runs on another one here and the main thread keeps the signals.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pipeline.console import say

if TYPE_CHECKING:
    from vit.loop import LoopEnd

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_SECONDS = 1.0  # how often rank 0 asks whether a stop was requested


class TrainingStopped(KeyboardInterrupt):
    """Pretraining stopped on request after checkpointing its last step; relaunching continues it."""


# How long a driver giving up on a fit waits for Ray Train's controller to abort it: one that can answers in
# a second or two; one stuck waiting for placement never does, and its actors end with the driver anyway.
ABORT_WAIT_S = 10.0


class RunControl:
    """The actor between the driver and the workers of one launch (every worker group it runs)."""

    def __init__(self) -> None:
        self._stop = False
        self._end: LoopEnd | None = None
        self._regroups: set[tuple[str, ...]] = set()  # the node sets a regroup was tried on
        self._controller: Any = None  # Ray Train's controller of the group running now

    def try_regroup(self, nodes: list[str]) -> bool:
        """Whether rank 0 may regroup to grow on this set of live nodes: once per set, so that room a
        regroup could not use (another job's, a node too small) does not restart the group again."""
        key = tuple(sorted(nodes))
        if key in self._regroups:
            return False
        self._regroups.add(key)
        return True

    def set_controller(self, controller: Any) -> None:
        self._controller = controller

    def abort_group(self) -> None:
        """Abort the running fit (its controller ends the worker group), as the driver gives up on it.
        Waited for ABORT_WAIT_S at most: a controller stuck waiting for placement may never answer, and the
        driver that gives up must not wait with it (its actors end with it all the same)."""
        if self._controller is not None:
            import ray

            # ray.wait, not ray.get: the controller exits as it aborts, which is no error here
            ray.wait([self._controller.abort.remote()], timeout=ABORT_WAIT_S)

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def ended(self, end: LoopEnd) -> None:
        self._end = end

    def end(self) -> LoopEnd | None:
        """How rank 0's loop ended; None when it never ended (the workers failed). Cleared as it is read,
        for the next group of the launch."""
        end, self._end = self._end, None
        return end


def start_control() -> Any:
    """A RunControl actor for this launch (no CPU: it only holds a few flags), on the driver's own node, as
    Ray Train's controller is: a worker node that goes (a spot reclaim) must not take it along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(RunControl).remote()


class StopPoll:
    """Rank 0's `stop_requested` hook: asks the actor at most every POLL_SECONDS, remembers a yes."""

    def __init__(self, control: Any) -> None:
        self.control, self.asked_at, self.requested = control, 0.0, False

    def __call__(self) -> bool:
        import ray

        now = time.monotonic()
        if not self.requested and now - self.asked_at >= POLL_SECONDS:
            self.asked_at = now
            self.requested = bool(ray.get(self.control.stop_requested.remote()))
        return self.requested


def fit_stoppably(fit: Callable[[], Any], control: Any, watch: Callable[[], None] | None = None) -> Any:
    """`fit()` on a thread of its own while this (main) thread turns the first SIGINT/SIGTERM into a stop
    request and the second into KeyboardInterrupt, and calls `watch` (which may raise to give up on the
    fit) as it waits; returns what `fit` returns, raises what it raises."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # handed to the main thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="vitpipe-fit", daemon=True)
    with _stop_on_signals(control):
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            if watch is not None:
                watch()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextlib.contextmanager
def _stop_on_signals(control: Any) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: whoever runs us there handles them
        return
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            control.request_stop.remote()
            say(
                f"\npretrain: {name}: the workers finish this step, checkpoint it and stop "
                f"({name} again to stop at once, losing the steps since the last checkpoint)",
                err=True,
            )
            return
        raise KeyboardInterrupt(f"stopped at once by a second {name}; the newest checkpoint is kept")

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
