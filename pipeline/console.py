"""What a person sees while a command runs: vitpipe's own lines, one live progress bar (plain periodic
lines when the output is not a terminal), and warnings and errors in full. Everything else this process
and its Ray workers print (Ray, Ray Data, Ray Train, DeepSpeed, warnings known to be harmless) goes to
the current log file only, and to the console too with `--verbose`.

vitpipe code prints through `say` and `progress`. On the driver, under a `Console`, they go straight to
the terminal and the log; in a Ray worker they print a line marked `[vitpipe] ` (or
`[vitpipe bar DONE/TOTAL] `), which Ray forwards to the driver, where the console shows it unmarked.
Everything else is captured twice over: sys.stdout/sys.stderr are replaced, and file descriptors 1 and 2
point at a pipe, so output from C++ (Ray's core), subprocesses and handlers bound to the old streams
is caught as well.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

MARK = "[vitpipe] "
BAR_MARK = re.compile(r"^\[vitpipe bar (\d+)/(\d+)\] ")
# Ray's prefix of a line forwarded from a worker: "(RayTrainWorker pid=123, ip=10.0.0.2) text", the task's
# or actor's name first (a task's name is vitpipe's, such as "transfer:digits/pretrained").
FORWARDED = re.compile(r"^\((?:[^()]* )?pid=\d+[^)]*\) (.*)$|^\(raylet[^)]*\) (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ALERT = re.compile(
    r"(^Traceback \(most recent call last\))|(\b\w*(Warning|Error|Exception)\b:)|(^\s*(ERROR|CRITICAL)\b)"
    r"|(\b(ERROR|CRITICAL)\s+\S+\.py:\d+)"
)
# Warnings and errors that are Ray's, Ray Train's, DeepSpeed's or torch's business, not the user's; each
# says nothing a vitpipe user can act on. Anything else that looks like a warning or an error is shown.
HARMLESS = re.compile(
    "|".join(
        [
            r"torch\.distributed\.\w+` is deprecated",  # DeepSpeed's calls, not ours (seen in every run)
            # Ray Train's controller and its placement-group watchdog: timeouts stopping one another under
            # load. A training failure is what vitpipe reports itself, with the error, when a step fails.
            r"^\((TrainController|PlacementGroupCleaner) pid=",
            r"PreemptionWatcher",  # Ray Train polls a GCE metadata server that a non-GCE node lacks
            r"FutureWarning: .*(torch\.cuda\.amp\.|TypedStorage)",  # DeepSpeed's use of old torch APIs
            r"RayDeprecationWarning",  # Ray's notices of its own API moves
        ]
    )
)
# Without a terminal, a piece of work prints a line when it is done, and before that each time it passes
# another tenth of the way if the last line is PROGRESS_EVERY_S old, or when it is QUIET_S old.
PROGRESS_EVERY_S = 30.0
SYNC_LINE = b"\x00vitpipe-console-sync\n"  # written to the pipe to know its reader has caught up
QUIET_S = 300.0


def say(text: str, *, err: bool = False) -> None:
    """Print one of vitpipe's own messages (any number of lines), wherever this code runs."""
    console = Console.active
    if console is not None:
        console.message(text, err=err)
    elif _in_ray_worker():
        print("\n".join(MARK + line for line in text.splitlines() or [""]), flush=True)
    else:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def detail(text: str) -> None:
    """A line of vitpipe's that a person rarely needs: the log only (and the console with --verbose)."""
    console = Console.active
    if console is not None:
        console.captured(text + "\n")
    else:
        print(text, flush=True)  # in a worker: unmarked, so the driver's console keeps it in the log


def progress(text: str, done: int, total: int) -> None:
    """Report progress (`label: ...`, `done` of `total` units): the live bar on a terminal, else a line
    now and then (PROGRESS_EVERY_S). Outside a console (a library call) each report is a line."""
    console = Console.active
    if console is not None:
        console.bar(text, done, total)
    elif _in_ray_worker():
        print(f"[vitpipe bar {done}/{total}] {text}", flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


class LinePacing:
    """When reports of a piece of work's progress become lines, where no live bar shows them: when the work
    is done, when it passed another tenth of the way and its last line is `every_s` old, or when that line
    is QUIET_S old. Short work shows its last line only."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S) -> None:
        self.every_s = every_s
        self._last_line: dict[str, tuple[float, int]] = {}  # label: when, and the tenth it showed

    def due(self, label: str, done: int, total: int) -> bool:
        """Whether this report of `label`'s work (`done` of `total`) is a line; if so, it counts as shown."""
        now = time.monotonic()
        last, shown_tenth = self._last_line.setdefault(label, (now, 0))
        tenth = int(10 * done / total) if total > 0 else 0
        if done >= total or (tenth > shown_tenth and now - last >= self.every_s) or now - last >= QUIET_S:
            self._last_line[label] = (now, tenth)
            return True
        return False


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        return global_worker.mode == WORKER_MODE
    except (ImportError, AttributeError):
        return True  # a marked line reads fine even where no console strips the mark


class Console:
    """The console of one command: start it before Ray is imported, `log_to` a file per stage, stop it
    at the end. Only one is active in a process at a time (`Console.active`)."""

    active: Console | None = None

    def __init__(self, *, verbose: bool = False, every_s: float = PROGRESS_EVERY_S) -> None:
        self.verbose = verbose
        self._pacing = LinePacing(every_s)
        self._lock = threading.RLock()
        self._log: IO[str] | None = None
        self._held: list[str] = []  # what was printed before any log file was named
        self._held_foreign = False  # whether that holds lines other than vitpipe's own
        self._bar: str = ""
        self._in_alert = False
        self.hidden = 0  # lines kept out of the console (they are in the log)
        self.fallback: Path | None = None

    # ---------------------------------------------------------------- start and stop

    def start(self) -> Console:
        if Console.active is not None:
            raise RuntimeError("a vitpipe console is already active in this process")
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # plain "(pid=...)" prefixes, in logs too
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # alike lines of two tasks are two lines
        self._saved = sys.stdout, sys.stderr
        self.out, self.err = (_terminal(stream, fd) for stream, fd in zip(self._saved, (1, 2), strict=True))
        self.tty = _isatty(self.err)
        for stream in self._saved:
            with contextlib.suppress(Exception):
                stream.flush()
        self._fds = self._redirect_fds()
        sys.stdout, sys.stderr = _Captured(self, 1), _Captured(self, 2)
        Console.active = self
        return self

    def stop(self) -> None:
        """Put the streams back, read what is left in the pipe, and close the log."""
        if Console.active is not self:
            return
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Captured):
                stream.flush_partial()
        self._sync_fds()
        sys.stdout, sys.stderr = self._saved
        Console.active = None
        self._restore_fds()
        with self._lock:
            if self._bar and self.tty:
                self._write(self.err, "\n")
            self._bar = ""
            self._write(self.err, "")
            self._write(self.out, "")
            for ours, theirs in zip((self.out, self.err), self._saved, strict=True):
                if ours is not theirs:  # a copy of a file descriptor made by start(), or the null device
                    with contextlib.suppress(BrokenPipeError):
                        ours.close()
            if self._log is None and self._held_foreign:  # no log named: keep what others printed anyway
                stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
                self.fallback = Path(tempfile.gettempdir()) / "vitpipe-logs" / stamp
                self.fallback.parent.mkdir(parents=True, exist_ok=True)
                self.fallback.write_text("".join(self._held))
            if self._log is not None:
                self._log.close()
                self._log = None

    @contextlib.contextmanager
    def log_to(self, path: str | Path, header: str) -> Iterator[None]:
        """Send everything printed inside this block to `path` (appended, after a header line)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            previous = self._log
            self._log = path.open("a", buffering=1)
            self._log.write("".join(self._held) + f"===== {header}\n")
            self._held.clear()
            self._held_foreign = False
        try:
            yield
        finally:
            self._sync_fds()  # what was printed inside the block goes to its log
            with self._lock:
                self._log.close()
                self._log = previous

    # ---------------------------------------------------------------- vitpipe's own output

    def message(self, text: str, *, err: bool = False) -> None:
        with self._lock:
            self._record(text + "\n")
            self._show(text, self.err if err else self.out)

    def bar(self, text: str, done: int, total: int) -> None:
        with self._lock:
            self._record(text + "\n")
            if self.tty:
                self._bar = f"{_bar(done, total)} {text}"
                self._write(self.err, "\r\x1b[K" + self._bar[: self._width() - 1])
                return
            if self._pacing.due(text.split(":", 1)[0], done, total):
                self._show(text, self.err)

    # ---------------------------------------------------------------- everything else

    def captured(self, line: str) -> None:
        """A line someone else printed (or a worker's line Ray forwarded): shown, or kept in the log."""
        plain = ANSI.sub("", line).rstrip("\r\n")
        forwarded = FORWARDED.match(plain)
        body = next((group for group in forwarded.groups() if group is not None), "") if forwarded else plain
        if body.startswith(MARK):
            self.message(body[len(MARK) :])
            return
        marked = BAR_MARK.match(body)
        if marked:
            self.bar(body[marked.end() :], int(marked.group(1)), int(marked.group(2)))
            return
        with self._lock:
            self._record(line if line.endswith("\n") else line + "\n")
            self._held_foreign |= self._log is None
            if self.verbose or self._alert(body, plain):
                self._show(plain, self.err)
            else:
                self.hidden += 1

    def _alert(self, body: str, line: str) -> bool:
        """A warning or error worth a person's eyes, with the indented lines that follow it (`line` is
        `body` with Ray's prefix, which names who printed it)."""
        if self._in_alert and (body.startswith((" ", "\t")) or body.startswith("During handling")):
            return True
        self._in_alert = bool(ALERT.search(body)) and not HARMLESS.search(line)
        return self._in_alert

    def _record(self, text: str) -> None:
        if self._log is not None:
            with contextlib.suppress(ValueError):
                self._log.write(text)
        else:
            self._held.append(text)

    def _show(self, text: str, stream: IO[str]) -> None:
        if stream.closed:  # a late line from a handler that kept this console's stream: the log has it
            return
        if self._bar and self.tty:
            self._write(self.err, "\r\x1b[K")
        self._write(self.out if stream is self.out else self.err, text + "\n")
        if self._bar and self.tty:
            self._write(self.err, self._bar[: self._width() - 1])

    def _write(self, stream: IO[str], text: str) -> None:
        """Write to the terminal side. When its reader is gone (`vitpipe run JOB | head`), that side goes
        nowhere from then on and the command carries on: the log keeps every line."""
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            nowhere = open(os.devnull, "w")  # noqa: SIM115 (closed by stop(), as the stream it replaces)
            self.out, self.err = (nowhere if ours is stream else ours for ours in (self.out, self.err))
            if stream not in self._saved:  # our copy of the file descriptor: closed now, its reader gone
                with contextlib.suppress(OSError):
                    stream.close()

    def _width(self) -> int:
        try:
            return max(40, os.get_terminal_size(self.err.fileno()).columns)
        except (AttributeError, OSError, ValueError):
            return 120

    # ---------------------------------------------------------------- file descriptors

    def _redirect_fds(self) -> tuple[int, int, int, threading.Thread] | None:
        """Point fds 1 and 2 at a pipe read by a thread; None where they cannot be (no such fds)."""
        try:
            saved = os.dup(1), os.dup(2)
        except OSError:
            return None
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._stop_reading = threading.Event()
        self._synced = threading.Event()
        reader = threading.Thread(target=self._read_pipe, args=(read,), name="vitpipe-console", daemon=True)
        reader.start()
        return saved[0], saved[1], read, reader

    def _sync_fds(self, timeout_s: float = 2.0) -> None:
        """Wait until the pipe's reader has passed on everything written to fds 1 and 2 so far."""
        if self._fds is None:
            return
        self._synced.clear()
        os.write(1, SYNC_LINE)
        self._synced.wait(timeout_s)

    def _restore_fds(self) -> None:
        if self._fds is None:
            return
        out, err, read, reader = self._fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self._stop_reading.set()
        reader.join(timeout=5)
        os.close(read)

    def _read_pipe(self, read: int) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([read], [], [], 0.1)
            if not ready:
                if self._stop_reading.is_set():
                    break
                continue
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            pending += chunk
            *lines, pending = re.split(rb"(?<=\n)", pending)
            for line in lines:
                if line == SYNC_LINE:
                    self._synced.set()
                else:
                    self.captured(line.decode(errors="replace"))
        if pending:
            self.captured(pending.decode(errors="replace"))


class _Captured:
    """What sys.stdout / sys.stderr become under a console: whole lines go to `Console.captured`."""

    def __init__(self, console: Console, fd: int) -> None:
        self.console, self.fd = console, fd
        self._partial = threading.local()

    def write(self, text: str) -> int:
        buffered = getattr(self._partial, "text", "") + text
        *lines, rest = re.split(r"(?<=\n)", buffered)
        self._partial.text = rest
        for line in lines:
            self.console.captured(line)
        return len(text)

    def flush_partial(self) -> None:
        rest = getattr(self._partial, "text", "")
        if rest:
            self._partial.text = ""
            self.console.captured(rest)

    def flush(self) -> None:
        """Lines are passed on whole; a partial one waits for its end."""

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fd

    @property
    def encoding(self) -> str:
        return "utf-8"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console._saved[self.fd - 1], name)


@contextlib.contextmanager
def console(*, verbose: bool = False) -> Iterator[Console]:
    """A console for the length of a command."""
    active = Console(verbose=verbose).start()
    try:
        yield active
    finally:
        active.stop()


@contextlib.contextmanager
def session(*, verbose: bool = False) -> Iterator[Console]:
    """The active console, or one for this block (a library call such as a test's `run_job`)."""
    if Console.active is not None:
        yield Console.active
        return
    with console(verbose=verbose) as started:
        yield started


@contextlib.contextmanager
def log_to(path: str | Path, header: str) -> Iterator[None]:
    """The active console's `log_to`; without one (a library call), the block runs as it is."""
    if Console.active is None:
        yield
        return
    with Console.active.log_to(path, header):
        yield


def output_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (`vitpipe jobs | head -1`); if so it
    now points at the null device, so that Python's own last flush does not fail again as it exits."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def _terminal(stream: Any, fd: int) -> IO[str]:
    """Where the console writes: a copy of the real file descriptor when `stream` is one (it is about
    to point at the pipe), else the stream itself (a test's captured stream)."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        pass
    return stream


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * min(1.0, done / total)) if total > 0 else 0
    return "━" * filled + "╺" + " " * (width - filled)
