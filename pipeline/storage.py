"""Folders on local disk or object storage: fetch one to work on locally, publish one built locally."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.preprocess.sources import resolve


def local_folder(location: str, scratch: Path) -> Path:
    """A local folder with the contents of `location`: the folder itself when local, else a download."""
    filesystem, path = resolve(location)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(path)
    scratch.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(scratch), source_filesystem=filesystem)
    return scratch


def publish_folder(staged: Path, out: str) -> None:
    """Put every entry of the staged folder into OUT, replacing entries of the same name (local: a rename
    per entry, so readers see whole files; remote: an upload)."""
    filesystem, root = resolve(out)
    if isinstance(filesystem, pafs.LocalFileSystem):
        target = Path(root)
        target.mkdir(parents=True, exist_ok=True)
        for part in staged.iterdir():
            destination = target / part.name
            if destination.is_dir():
                shutil.rmtree(destination)
            shutil.move(str(part), destination)
        return
    pafs.copy_files(str(staged), root, destination_filesystem=filesystem)


def remove_folder(location: str) -> None:
    """Delete a folder and everything in it, if it exists."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
