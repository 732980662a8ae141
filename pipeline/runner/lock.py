"""A run folder's lock, RUN/.lock: held by every command that writes into a run (`run`, the single-stage
commands, `export`), so that two of them never write the same files. It names its holder (pid, host); a
lock whose process is gone is taken over.

No Ray and no torch here: `status` and the refusals read it in a second.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
RUN_FILE = "run.json"


@contextlib.contextmanager
def run_lock(root: Path, hint: str = "") -> Iterator[None]:
    """Hold ROOT/.lock for the block; a lock left by a process that is gone is taken over. `hint` ends
    the refusal's message (another way to do what was asked)."""
    lock = root / LOCK_FILE
    for _ in range(2):
        if _create(lock):
            break
        holder = lock_holder(lock)
        if holder is not None:
            raise RuntimeError(
                f"{root} is in use by another vitpipe command (pid {holder['pid']} on "
                f"{holder['host']}); wait for it, or delete {lock} if that run is gone{hint}"
            )
        lock.unlink(missing_ok=True)  # its process is gone
    else:
        raise RuntimeError(f"{root}: could not take {lock}: another command took it at the same moment")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _create(lock: Path) -> bool:
    """Create the lock with its holder already in it (a hard link of a written file: no reader ever sees
    an empty lock and takes it for a stale one)."""
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    written = lock.with_name(f"{LOCK_FILE}.{uuid.uuid4().hex[:8]}.partial")
    written.write_text(me)
    try:
        os.link(written, lock)
    except FileExistsError:
        return False
    except OSError:  # a mount without hard links (gcsfuse, s3fs): create it exclusively, then fill it
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as stream:
            stream.write(me)
    finally:
        written.unlink()
    return True


# How long a lock without its holder in it is taken for one being written: on a mount without hard links
# (gcsfuse, s3fs) it is created empty and then filled, and a command reading it between must not take it over.
FILLING_S = 30.0


def lock_holder(lock: Path) -> dict[str, Any] | None:
    """Who holds the lock, or None when it was left by a process on this host that no longer runs (or is
    an empty lock older than FILLING_S: its writer died before filling it)."""
    holder = _json_object(lock)
    if "pid" not in holder:
        return {"pid": "?", "host": "? (the lock is being written)"} if _age(lock) < FILLING_S else None
    if holder.get("host") != socket.gethostname():
        return holder  # another machine's process: cannot tell whether it still runs
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return None
    except PermissionError:
        return holder
    return holder


def _age(path: Path) -> float:
    """Seconds since `path` was last written (infinite when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return math.inf


def writer_lock(folder: str | None, run_dir: str) -> contextlib.AbstractContextManager[None]:
    """The lock a command outside `vitpipe run` takes to write `folder` (None: somewhere inside the
    pretraining run folder RUN_DIR, as `vitpipe export` does by default): that of the run folder it is
    in, else of RUN_DIR when the folder is inside it; none for a URL or a folder outside both, where no
    running command writes."""
    target = folder or run_dir
    root = owning_run(target)
    if root is None and "://" not in target + run_dir:
        pretraining = Path(run_dir).expanduser().absolute()
        inside = Path(target).expanduser().absolute()
        root = pretraining if inside == pretraining or pretraining in inside.parents else None
    return run_lock(root, "; or write elsewhere with --out") if root is not None else contextlib.nullcontext()


def owning_run(folder: str) -> Path | None:
    """The run folder that `folder` is in (itself or the nearest folder above it with vitpipe's run.json
    or lock), for a command that writes there; None for a URL or a folder outside any run."""
    if "://" in folder:
        return None
    path = Path(folder).expanduser().absolute()
    return next((candidate for candidate in (path, *path.parents) if _is_run_folder(candidate)), None)


def _is_run_folder(folder: Path) -> bool:
    run, lock = _json_object(folder / RUN_FILE), _json_object(folder / LOCK_FILE)
    return str(run.get("format", "")).startswith("vitpipe.run/") or "pid" in lock


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
