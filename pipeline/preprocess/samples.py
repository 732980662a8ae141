"""A WebDataset shard as a stream of samples, with every problem reported instead of raised.

Members are grouped into samples by key exactly as webdataset does (`base_plus_ext`: the key is the
path up to the first dot of the file name). The tar is read as a stream, so memory holds one sample.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

from pipeline.config import IMAGE_EXTENSIONS

_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


@dataclass(frozen=True)
class Sample:
    key: str
    members: dict[str, bytes]  # lower-case extension -> bytes


@dataclass(frozen=True)
class Failure:
    key: str
    reason: str


class SampleError(ValueError):
    """A sample that cannot be used; the message starts with the kind of problem (`missing label: ...`)."""


class UnreadableShardError(OSError):
    """The shard is not a tar at all: nothing in it can be read."""


def read_samples(stream: BinaryIO) -> Iterator[Sample | Failure]:
    """Yield the shard's samples in order, and a Failure for each duplicate, and for a truncated tail.

    A key seen earlier in the shard keeps its first sample; a sample holding the same member twice is
    dropped whole (which copy is right is unknowable). A tar that breaks off ends the stream with a
    Failure naming the sample being read; the samples before it are kept. Bytes that are no tar at
    all raise UnreadableShardError before anything is yielded.
    """
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    repeated: str | None = None
    count = 0

    def finish() -> Sample | Failure | None:
        if key is None:
            return None
        if key in seen:
            return Failure(key, "duplicate key: an earlier sample in this shard has the same key")
        seen.add(key)
        if repeated is not None:
            return Failure(key, f"duplicate key: member {key}.{repeated} appears twice")
        return Sample(key, members)

    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115  closed in the finally below
    except _TAR_ERRORS as error:
        raise UnreadableShardError(f"unreadable shard: not a tar file ({error})") from None
    try:
        while True:
            try:
                info = tar.next()
                if info is None:
                    break
                if not info.isfile():
                    continue
                base, extension = base_plus_ext(info.name)
                if base is None or _is_meta(info.name):
                    continue
                if base != key:
                    if (done := finish()) is not None:
                        yield done
                    key, members, repeated = base, {}, None
                extension = extension.lower()
                payload = tar.extractfile(info).read()  # type: ignore[union-attr]
                if extension in members:
                    repeated = extension
                members[extension] = payload
                count += 1
            except _TAR_ERRORS as error:
                if key is None:
                    raise UnreadableShardError(f"unreadable shard: not a tar file ({error})") from None
                yield Failure(key, f"truncated shard: the tar breaks off after {count} members ({error})")
                return
        if (done := finish()) is not None:
            yield done
    finally:
        tar.close()


def _is_meta(name: str) -> bool:
    """webdataset's own metadata members (`__key__`-style names) carry no sample."""
    leaf = name.rsplit("/", 1)[-1]
    return leaf.startswith("__") and leaf.split(".")[0].endswith("__")


def dotted_images(members: dict[str, bytes], image_keys: tuple[str, ...]) -> list[str]:
    """The images of a sample that has none of `image_keys` but images behind a second dot (`0.png` of
    `cat.0.png`): members webdataset's key rule joined into one sample. Empty when an image is found."""
    if any(key in members for key in image_keys):
        return []
    images = {*IMAGE_EXTENSIONS, *(key.rsplit(".", 1)[-1] for key in image_keys)}  # `KEY.N.png` is an image
    return sorted(ext for ext in members if "." in ext and ext.rsplit(".", 1)[1] in images)


def dotted_reason(key: str, extensions: list[str]) -> str:
    """Why images named `cat.0.png`, `cat.1.png` are lost, and what to name them instead."""
    named = ", ".join(f"{key}.{ext}" for ext in extensions[:3]) + (" ..." if len(extensions) > 3 else "")
    first = f"{key}.{extensions[0]}"
    stem, _, suffix = extensions[0].rpartition(".")
    one_dot = f"{stem.replace('.', '_')}.{suffix}"
    return (
        f"dots in member names: {named} are one sample ({len(extensions)} image(s) lost): webdataset's key "
        f"is the name up to the first dot, so {first} has key {key!r} and extension {extensions[0]!r}; name "
        f"members KEY.EXT with one dot, e.g. {key}_{one_dot} or {key}/{one_dot}"
    )


class LabelError(SampleError):
    """A sample's label is missing or not a class index."""


def parse_label(members: dict[str, bytes], label_key: str) -> int:
    """The class index of a sample: `cls` reads the integer in `.cls`; `json:label` a field of `.json`.

    A dotted field (`json:meta.label`) walks nested objects.
    """
    extension, _, field = label_key.partition(":")
    if extension not in members:
        raise LabelError(f"missing label: the sample has no .{extension} member")
    payload = members[extension]
    if not field:
        text = payload.decode("utf-8", errors="replace").strip()
        try:
            value: object = int(text)
        except ValueError:
            raise LabelError(f"malformed label: .{extension} holds {text[:40]!r}, not an integer") from None
    else:
        try:
            value = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LabelError(f"malformed label: .{extension} is not valid JSON ({error})") from None
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise LabelError(f"missing label: .{extension} has no field {field!r}")
            value = value[part]
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabelError(f"malformed label: {label_key} is {value!r}, not an integer")
    if value < 0:
        raise LabelError(f"malformed label: {label_key} is {value}, a class index cannot be negative")
    return value
