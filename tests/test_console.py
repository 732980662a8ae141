"""The console a person reads: vitpipe's own lines (from the driver and, through Ray, from its workers)
shown without Ray's prefixes, warnings shown in full, what Ray and the libraries print kept in the log
(and shown with --verbose), one live bar on a terminal and a line now and then without one."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import ray

from pipeline.console import Console, console, log_to, progress, say
from tests.conftest import REPO


@ray.remote(num_cpus=0)
def chatty() -> None:
    """What a worker prints during a stage: vitpipe's lines, progress, and everyone else's."""
    say("hello from a task")
    progress("work: 3/3 items, done", 3, 3)
    print("internal worker line from some library", flush=True)
    warnings.warn("the user's data is odd", UserWarning, stacklevel=1)
    sys.stderr.write("c10d.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated\n")
    sys.stderr.write("  return func(*args, **kwargs)\n")
    sys.stderr.flush()
    say("task done")


def wait_for(path: Path, text: str, timeout_s: float = 30.0) -> None:
    """Ray forwards a worker's lines to the driver asynchronously."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never reached {path}")


def run_chatty_stage(log: Path, *, verbose: bool) -> None:
    with console(verbose=verbose), log_to(log, "a stage"):
        say("stage: starting")
        ray.get(chatty.options(name="transfer:digits/pretrained").remote())  # named as vitpipe names tasks
        wait_for(log, "task done")
        print("driver-side noise (a library's print)")
        os.write(2, b"fd-level noise (C++ or a subprocess)\n")
        say("stage: done")


def test_worker_lines_are_shown_and_everything_else_is_kept_in_the_log(ray_local, tmp_path, capsys):
    log = tmp_path / "stage.log"
    run_chatty_stage(log, verbose=False)
    out, err = capsys.readouterr()
    shown = out + err
    assert out.splitlines() == ["stage: starting", "hello from a task", "task done", "stage: done"]
    assert "work: 3/3 items, done" in err  # a finished bar's last line
    assert "UserWarning: the user's data is odd" in err  # a warning in full, with its source line
    assert "[vitpipe" not in shown
    for hidden in (
        "internal worker line",
        "all_gather_into_tensor",
        "return func",
        "driver-side noise",
        "fd-level noise",
    ):
        assert hidden not in shown
        assert hidden in log.read_text()  # nothing is lost: it is in the stage's log
    assert "hello from a task" in log.read_text()


def test_verbose_shows_what_ray_and_the_libraries_print(ray_local, tmp_path, capsys):
    run_chatty_stage(tmp_path / "stage.log", verbose=True)
    shown = "".join(capsys.readouterr())
    assert "internal worker line from some library" in shown
    assert "driver-side noise" in shown
    assert "fd-level noise" in shown


def test_without_a_terminal_progress_is_a_line_now_and_then(capsys):
    screen = Console(every_s=60).start()
    try:
        for done in range(1, 101):
            progress(f"shards: {done}/100", done, 100)
        progress("pretrain: step 5/40", 5, 40)  # under a minute old: not printed yet
    finally:
        screen.stop()
    assert capsys.readouterr().err.splitlines() == ["shards: 100/100"]

    screen = Console(every_s=0).start()  # long work: a line each tenth of the way
    try:
        for done in range(1, 101):
            progress(f"shards: {done}/100", done, 100)
    finally:
        screen.stop()
    assert capsys.readouterr().err.splitlines() == [f"shards: {done}/100" for done in range(10, 101, 10)]


def test_a_terminal_gets_one_live_bar_that_messages_print_above(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    screen = Console().start()
    try:
        progress("pretrain: step 10/40", 10, 40)
        say("checkpoint written", err=True)
        progress("pretrain: step 20/40", 20, 40)
    finally:
        screen.stop()
    text = terminal.getvalue()
    assert text.count("\n") == 2  # the message, and the bar's end when the console stops
    lines = [frame.rsplit("\r\x1b[K", 1)[-1] for frame in text.split("\n")]
    assert lines[0] == "checkpoint written"
    assert lines[1].endswith("pretrain: step 20/40")
    assert "━━━━━━━━━━━━" in lines[1]  # half of the bar
    assert "pretrain: step 10/40" in text  # drawn, then replaced in place


def test_only_one_console_at_a_time(capsys):
    with console(), pytest.raises(RuntimeError, match="already active"):
        Console().start()


def test_a_reader_gone_from_the_console_leaves_the_command_running_and_the_log_whole(tmp_path, monkeypatch):
    """`vitpipe run JOB | head -1`: once `head` has gone, lines go nowhere, the run carries on, the log
    keeps every line, and nothing says "Broken pipe"."""
    read, write = os.pipe()
    os.close(read)
    gone = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", gone)
    log = tmp_path / "stage.log"
    with console(), log_to(log, "stage"):
        for index in range(3):
            say(f"line {index}")
        say("on stderr", err=True)
    monkeypatch.undo()
    assert [f"line {index}" in log.read_text() for index in range(3)] == [True] * 3
    assert gone.closed is False  # the caller's own stream is left to the caller
    with contextlib.suppress(BrokenPipeError):
        gone.close()


def test_a_command_whose_reader_went_away_exits_quietly():
    """`vitpipe validate JOB | head -1`: exit 141 (as a shell tool killed by SIGPIPE), no traceback."""
    command = [sys.executable, "-m", "pipeline.cli", "validate", str(REPO / "jobs" / "quickstart.yaml")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    error = process.stderr.read().decode()
    assert (process.wait(timeout=60), error) == (141, "")
