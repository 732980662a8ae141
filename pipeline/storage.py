"""Filesystems and atomic writes: the one place vitpipe turns a location into a filesystem, and the one
way it writes a file or a folder so that a reader (or a rerun after a kill) never sees half of it.

A location is a local path, a `file://` URL, or any URL pyarrow (s3://, gs://, hdfs://) or fsspec knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import socket
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

try:
    import fsspec  # the URL forms pyarrow does not know; optional
except ImportError:
    fsspec = None

PARTIAL_SUFFIX = ".partial"
CONNECT_TIMEOUT_S = 5.0  # how long check_location waits for an endpoint to accept a connection


# The options pyarrow reads from a URL's query, by scheme (pyarrow 25; tests/test_storage.py checks them
# against the installed pyarrow); any other key is refused here, naming these, before anything connects.
URL_OPTIONS = {
    "s3": (
        "region",
        "scheme",
        "endpoint_override",
        "allow_bucket_creation",
        "allow_bucket_deletion",
        "tls_ca_file_path",
        "tls_ca_dir_path",
        "tls_verify_certificates",
        "allow_delayed_open",
        "smart_defaults",
    ),
    "gs": ("scheme", "endpoint_override", "retry_limit_seconds", "project_id"),
}
URL_OPTIONS["gcs"] = URL_OPTIONS["gs"]


def absolute(location: str) -> str:
    """A URL as it is; a local path made absolute."""
    return location if "://" in location else str(Path(location).expanduser().absolute())


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path, a `file://` URL or any URL pyarrow or fsspec knows. A URL
    whose options are wrong, or whose endpoint does not answer pyarrow's region lookup, is a ValueError
    naming it (in one line)."""
    if "://" not in location:
        return pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())
    check_url_options(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except OSError as error:  # S3 without a region asks the bucket's region at once
        raise ValueError(storage_error(location, error)) from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as pyarrow_error:
        scheme = location.split("://", 1)[0].lower()
        if (
            scheme in URL_OPTIONS
            and isinstance(pyarrow_error, pa.ArrowInvalid)
            and "parse URI" not in str(pyarrow_error)
        ):  # an option's value pyarrow refuses (`allow_bucket_creation=maybe`): its word, no detour
            raise ValueError(f"{location}: {pyarrow_error}") from None
        return _fsspec_filesystem(location, pyarrow_error)  # a scheme or URL form only fsspec knows


def _fsspec_filesystem(location: str, pyarrow_error: Exception) -> tuple[pafs.FileSystem, str]:
    if fsspec is None:
        raise ValueError(f"{location}: pyarrow cannot open it ({pyarrow_error})")
    try:
        filesystem, path = fsspec.core.url_to_fs(location)
    except (ValueError, ImportError) as error:
        raise ValueError(f"{location}: no filesystem for this URL ({error})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def check_url_options(location: str) -> None:
    """Each option of a URL's query known to its scheme, given once: `s3://b/p?bogus=1` names `bogus` and
    the keys there are, not a missing package."""
    scheme = location.split("://", 1)[0].lower()
    query = urllib.parse.urlsplit(location).query
    if scheme not in URL_OPTIONS or not query:
        return
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"{location}: the options after '?' are not KEY=VALUE pairs joined by '&'") from None
    keys = [key for key, _ in pairs]
    known = URL_OPTIONS[scheme]
    for key in keys:
        if key not in known:
            raise ValueError(
                f"{location}: unknown {scheme}:// URL option {key!r} (known: {', '.join(known)})"
            )
        if keys.count(key) > 1:
            raise ValueError(f"{location}: URL option {key!r} is given {keys.count(key)} times")


def check_location(location: str) -> None:
    """Fail now, in one line, for a URL whose options are wrong or whose endpoint does not answer, before
    any worker starts (one request; a folder not made yet is fine). A local path needs no check."""
    if "://" not in location:
        return
    filesystem, path = resolve(location)
    _connect(location)
    try:
        filesystem.get_file_info(path)
    except OSError as error:
        raise ValueError(storage_error(location, error)) from None


def _connect(location: str) -> None:
    """A TCP connection to a URL's `endpoint_override`, so that one nobody listens on fails at once (the
    S3 client retries a refused connection for seconds before it gives up)."""
    options = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
    endpoint = options.get("endpoint_override")
    if not endpoint:
        return
    parsed = urllib.parse.urlsplit(
        endpoint if "://" in endpoint else f"{options.get('scheme', 'https')}://{endpoint}"
    )
    try:
        port = parsed.port or (80 if parsed.scheme == "http" else 443)
    except ValueError:
        raise ValueError(f"{location}: endpoint_override {endpoint!r} has no valid port") from None
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        tried = f"a TCP connection to {parsed.hostname}:{port} failed ({error.strerror or error})"
        raise ValueError(f"{location}: cannot reach {_endpoint(location)}: {tried}") from None


def check_not_a_file(location: str) -> None:
    """A location a command writes folders into must not be a file (nor have one on its path)."""
    filesystem, path = resolve(location)
    while path and path != posixpath.dirname(path):
        if filesystem.get_file_info(path).type == pafs.FileType.File:
            raise ValueError(f"{location}: {path} is a file; a folder is needed here")
        path = posixpath.dirname(path)


def storage_error(location: str, error: OSError) -> str:
    """One line for a filesystem's failure: the location, the endpoint, what was tried and why it failed."""
    text = " ".join(str(error).split())
    endpoint = _endpoint(location)
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        return f"{location}: cannot reach {endpoint}: {text}"
    return f"{location}: {endpoint}: {text}"


def _endpoint(location: str) -> str:
    url = urllib.parse.urlsplit(location)
    options = dict(urllib.parse.parse_qsl(url.query))
    if url.scheme == "s3":
        if "endpoint_override" in options:
            return f"the S3 endpoint {options['endpoint_override']}"
        for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(variable):
                return f"the S3 endpoint {os.environ[variable]} (${variable})"
        region = options.get("region")
        return f"AWS S3 ({f'region {region}' if region else 'region looked up from the bucket'})"
    return f"{url.scheme}://{url.netloc}"


def resolve_all(locations: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem and the paths on it of locations that share it (the files of one folder): the
    first is resolved, the others take its prefix off, so that a URL's filesystem is built once, not once
    per file (thousands of shards)."""
    filesystem, first = resolve(locations[0])
    base = _split_query(locations[0])[0]
    prefix = base[: len(base) - len(first)] if "://" in base and base.endswith(first) else None
    paths = []
    for location in locations:
        bare = _split_query(location)[0]
        paths.append(bare[len(prefix) :] if prefix and bare.startswith(prefix) else resolve(location)[1])
    return filesystem, paths


def join(location: str, *parts: str) -> str:
    """`location/part/...`, keeping a URL's query (`s3://b/runs?endpoint_override=HOST:PORT&scheme=http`
    stays the filesystem's settings, after the new path)."""
    base, query = _split_query(location)
    return posixpath.join(base, *parts) + query


def url_of(location: str, path: str) -> str:
    """A path on `location`'s filesystem (as `resolve` or a listing gives it) as a location like it: the
    same scheme and query for a URL, the path itself for a local one."""
    if "://" not in location:
        return path
    base, query = _split_query(location)
    return base.split("://", 1)[0] + "://" + path.lstrip("/") + query


def basename(location: str) -> str:
    """The last path component of a path or URL, a URL's query left out (`s3://b/run?scheme=http` -> run)."""
    return posixpath.basename(_split_query(location)[0].rstrip("/"))


def target_name(location: str) -> str:
    """The name a target given as a folder goes by: its last path component (`data/c10-384/` -> c10-384,
    a URL's query left out)."""
    return basename(location) or location


def _split_query(location: str) -> tuple[str, str]:
    if "://" not in location or "?" not in location:
        return location, ""
    base, _, query = location.partition("?")
    return base, "?" + query


@dataclass
class Walk:
    """The regular files below a folder, and the links a walk did not follow (a loop, a second way into
    one folder or file, a broken link): (path under the folder, `-> target: why`)."""

    files: list[pafs.FileInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def walk_files(filesystem: pafs.FileSystem, root: str) -> Walk:
    """Every regular file below `root`, each real folder and file once. On local disk links are followed,
    but a link into a folder already walked (`loop -> .`, `up -> ..`, two links to one folder) is skipped
    and named, so a loop neither multiplies the data nor walks forever; object stores have no links."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        return Walk([info for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File])
    walk, seen, paths = Walk(), {os.path.realpath(root)}, []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [name for name in _links_last(folder, dirs) if _first_visit(folder, name, root, seen, walk)]
        for name in _links_last(folder, names):
            path = os.path.join(folder, name)
            if os.path.islink(path) and not os.path.exists(path):
                walk.skipped.append((os.path.relpath(path, root), f"-> {os.readlink(path)}: a broken link"))
            elif os.path.isfile(path) and _first_visit(folder, name, root, seen, walk):
                paths.append(path)
    walk.files = [info for info in filesystem.get_file_info(paths) if info.type == pafs.FileType.File]
    return walk


def _links_last(folder: str, names: list[str]) -> list[str]:
    """Names sorted, the real entries before the links: of a folder and a link to it, the link is skipped."""
    return sorted(names, key=lambda name: (os.path.islink(os.path.join(folder, name)), name))


def _first_visit(folder: str, name: str, root: str, seen: set[str], walk: Walk) -> bool:
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if real not in seen:
        seen.add(real)
        return True
    target = os.readlink(path) if os.path.islink(path) else real
    what = "folder" if os.path.isdir(path) else "file"
    walk.skipped.append(
        (
            os.path.relpath(path, root),
            f"-> {target}: a {what} already walked (a loop, or a second link to it)",
        )
    )
    return False


def partial_name(path: str) -> str:
    """The temporary name a file is written under beside its final one: `.NAME.<id>.partial` (hidden, so
    shard listings skip it; the id keeps two writers of one name apart)."""
    directory, leaf = posixpath.split(path)
    return posixpath.join(directory, f".{leaf}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def is_partial(path: str) -> bool:
    leaf = posixpath.basename(path)
    return leaf.startswith(".") and leaf.endswith(PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_file(
    location: str, filesystem: pafs.FileSystem | None = None
) -> Iterator[tuple[pafs.FileSystem, str]]:
    """(filesystem, temporary path) to write `location` under; renamed to `location` when the block ends
    without an error, deleted when it raises. The folder is created. With `filesystem`, `location` is a
    path on it (as `resolve` returns), not a URL."""
    filesystem, path = (filesystem, location) if filesystem is not None else resolve(location)
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    partial = partial_name(path)
    try:
        yield filesystem, partial
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_file(partial)
        raise
    filesystem.move(partial, path)


def write_atomic(location: str, content: str | bytes) -> None:
    """Write a whole file: its readers see the old content or the new, never a torn one."""
    data = content.encode() if isinstance(content, str) else content
    with atomic_file(location) as (filesystem, partial), filesystem.open_output_stream(partial) as stream:
        stream.write(data)


def read_json(location: str) -> dict[str, Any] | None:
    """The JSON object in a file (path or URL); None when there is no such file. A file that is not a
    JSON object is an error naming it (a damaged record is not taken for a missing one)."""
    filesystem, path = resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            value = json.loads(stream.read())
    except FileNotFoundError:
        return None
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"{location}: damaged, not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{location}: damaged, not a JSON object")
    return value


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
    """Delete a folder and everything in it, if it exists (only for folders vitpipe made: see
    `remove_entries` where a folder may hold files of others)."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def remove_entries(location: str, ours: Callable[[str], bool]) -> list[str]:
    """Delete the entries of folder `location` whose names `ours` recognises as vitpipe's, and nothing
    else; returns the names of the entries left in place."""
    filesystem, root = resolve(location)
    left = []
    for entry in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if not ours(entry.base_name):
            left.append(entry.base_name)
        elif entry.type == pafs.FileType.Directory:
            filesystem.delete_dir(entry.path)
        else:
            filesystem.delete_file(entry.path)
    return sorted(left)
