"""A clean stop for a pretraining launch: the driver's first SIGINT or SIGTERM (Ctrl-C, a pod eviction,
a spot notice) asks the workers, through a small Ray actor, to train on to the next log step (where they
read the device and agree on a stop), checkpoint it and return; a second signal stops at once. The same
actor carries back how the workers' loop ended (finished, stopped, diverged), which the driver turns into
its exit and message. A study's driver makes one actor per point and asks every running point's (signals
reach the driver only, never a point's Ray task).

Ray Train's own SIGINT handler aborts the run without a checkpoint; it is installed only when `fit()`
runs on the main thread, so `fit()` runs on another one here and the main thread keeps the signals.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


def fit_stoppably(
    fit: Callable[[], Any], control: Any, watch: Callable[[], None] | None = None, signals: bool = True
) -> Any:
    """`fit()` on a thread of its own while this (main) thread turns the first SIGINT/SIGTERM into a stop
    request and the second into KeyboardInterrupt (unless `signals` is False: a study point's task, whose
    driver holds the signals and asks its control), and calls `watch` (which may raise to give up on the
    fit) as it waits; returns what `fit` returns, raises what it raises."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # handed to the main thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="vitpipe-fit", daemon=True)
    stopping = stop_on_signals([control], "pretrain", WORKERS_STOP) if signals else contextlib.nullcontext()
    with stopping:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            if watch is not None:
                watch()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


WORKERS_STOP = "the workers finish this step, checkpoint it and stop"


@contextlib.contextmanager
def stop_on_signals(controls: Iterable[Any], who: str, what: str) -> Iterator[list[int]]:
    """While inside, on the main thread: the first SIGINT/SIGTERM asks every RunControl in `controls` (read
    as the signal comes: a live view of a launch's controls) to stop, and says `what` happens then; the
    second raises KeyboardInterrupt. Yields the signals received so far (empty until a stop is asked)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signals reach the main thread only: whoever runs us there handles them
        return

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            for control in list(controls):
                control.request_stop.remote()
            say(
                f"\n{who}: {name}: {what} ({name} again to stop at once, losing the steps since the last "
                "checkpoint)",
                err=True,
            )
            return
        raise KeyboardInterrupt(f"stopped at once by a second {name}; the newest checkpoint is kept")

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def honour_interrupts() -> None:
    """A process started with SIGINT ignored (`vitpipe run JOB &` from a script: the shell ignores it for
    background jobs) takes SIGINT as any other: Python's KeyboardInterrupt replaces the inherited SIG_IGN.
    Call it on the main thread."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
