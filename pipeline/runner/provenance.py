"""Which code a run ran: the git revision of the checkout, or the one `vitpipe submit` recorded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REVISION_ENV = "VITPIPE_GIT_REV"  # set by `vitpipe submit`: a submitted working_dir carries no .git


def git_revision(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """{"rev": SHA, "dirty": bool} of the checkout at `root`, or the submitted one; None outside git."""
    if submitted := os.environ.get(REVISION_ENV):
        rev, _, state = submitted.partition("+")
        return {"rev": rev, "dirty": state == "dirty"}
    try:
        rev = _git(root, "rev-parse", "HEAD")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"rev": rev, "dirty": bool(changes)}


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(  # noqa: S603 (fixed git arguments)
        ["git", "-C", str(root), *args],  # noqa: S607 (git from PATH, as a user runs it)
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()
