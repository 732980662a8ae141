"""What inputs that lie cost, before and after issue 32, side by side in one run:

- listing a 2-shard folder as it is, with one `loop -> .` link, and with three loop links: vitpipe's walk
  (`storage.walk_files`) against the former one (pyarrow's recursive FileSelector, which follows links);
  the former is cut at `--limit` seconds, in a child process;
- an S3 endpoint nobody listens on: `storage.check_location` (a TCP connect first) against the S3 client's
  own first request (what every command did before), both to 127.0.0.1:1.

    python -m benchmarks.bench_bad_inputs [--limit 20]

Writes benchmarks/results/bad_inputs.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from benchmarks.machine import save
from pipeline.preprocess.sources import list_shards
from pipeline.storage import check_location, resolve

UNREACHABLE = "s3://bucket/path?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"


def corpus(root: Path, loops: int) -> Path:
    """Two shards (contents do not matter to a listing) and `loops` of the issue's three loop links."""
    folder = root / f"loops{loops}"
    (folder / "train").mkdir(parents=True)
    for index in range(2):
        (folder / "train" / f"a-{index:06d}.tar").write_bytes(b"x" * 1024)
    links = [("loop", "."), ("again", str(folder)), ("d/up", "..")][:loops]
    for name, target in links:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).symlink_to(target)
    return folder


def former_listing(folder: str, found: multiprocessing.Queue) -> None:
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    files = pafs.LocalFileSystem().get_file_info(selector)
    found.put(sum(1 for info in files if info.type == pafs.FileType.File and info.path.endswith(".tar")))


def timed_former(folder: Path, limit: float) -> dict:
    found: multiprocessing.Queue = multiprocessing.Queue()
    started = time.perf_counter()
    child = multiprocessing.Process(target=former_listing, args=(str(folder), found))
    child.start()
    child.join(limit)
    seconds = time.perf_counter() - started
    if child.is_alive():
        child.kill()
        child.join()
        return {"seconds": round(seconds, 3), "shards": None, "ended": False}
    return {"seconds": round(seconds, 3), "shards": found.get(), "ended": True}


def timed_walk(folder: Path) -> dict:
    started = time.perf_counter()
    listing = list_shards(str(folder))
    return {
        "seconds": round(time.perf_counter() - started, 4),
        "shards": len(listing.shards),
        "links_named": len(listing.skipped),
    }


def timed_endpoint() -> dict:
    started = time.perf_counter()
    try:
        check_location(UNREACHABLE)
    except ValueError as error:
        vitpipe = {"seconds": round(time.perf_counter() - started, 3), "message": str(error)}
    filesystem, path = resolve(UNREACHABLE)
    started = time.perf_counter()
    try:
        filesystem.get_file_info(path)
    except OSError as error:
        former = {"seconds": round(time.perf_counter() - started, 3), "message": str(error)}
    return {"vitpipe_check_location": vitpipe, "former_first_request": former}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=20.0, help="seconds the former listing may take")
    args = parser.parse_args()
    listings = {}
    with tempfile.TemporaryDirectory(prefix="bench-bad-inputs-") as scratch:
        for loops in (0, 1, 3):
            folder = corpus(Path(scratch), loops)
            listings[f"{loops}_loop_links"] = {
                "vitpipe": timed_walk(folder),
                "former": timed_former(folder, args.limit),
            }
            print(loops, listings[f"{loops}_loop_links"], flush=True)
    endpoint = timed_endpoint()
    print(endpoint, flush=True)
    path = save(
        "bad_inputs", {"former_cut_at_s": args.limit, "listing": listings, "unreachable_endpoint": endpoint}
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
