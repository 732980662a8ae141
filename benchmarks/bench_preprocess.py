"""Preprocessing throughput: vitpipe vs a naive webdataset+PIL loop, per core, and 1 -> 2 Ray workers.

Corpora: crops of scikit-learn's two sample photos at ImageNet size (500x375) and at 2000x1500,
JPEG quality 90, in 8 shards each, labelled. Target: 224px, patch 16, RGB. Measured, in rounds so
that the machine's drift hits every contender alike (medians reported):

- naive: one process, `webdataset.WebDataset(...).decode("pil")`, shorter side to 224 with Pillow's
  antialiased bilinear resize, centre crop, numpy patchify; nothing written (flatters the baseline);
- decode: Pillow full decode of the same JPEG bytes, nothing else (the floor without DCT scaling);
- vitpipe: `preprocess()` end to end (tar read, decode, resize, patchify, Parquet write, manifest)
  on a local Ray with 1 and then 2 CPUs, workers warmed up first;
- components, ms per image on one core: JPEG half-scale draft vs full decode (+ resize), torch's
  uint8 antialiased resize vs Pillow's, the Parquet patch column as fixed-size binary vs a nested
  fixed-size list (write and read), and what compression saves on 64 distinct photos' patches.

    .venv/bin/python -m benchmarks.bench_preprocess [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_sample_image

from benchmarks.machine import save
from pipeline.config import PreprocessConfig
from pipeline.datasets.shards import write_shard
from pipeline.preprocess import decode
from pipeline.preprocess.run import preprocess
from pipeline.ray_session import init_ray
from vit.patches import patchify

CONFIG = PreprocessConfig(image_size=224, patch_size=16)
CORPORA = {"imagenet_500x375": ((500, 375), 480), "large_2000x1500": ((2000, 1500), 96)}
SHARDS = 8


def make_corpus(directory: Path, size: tuple[int, int], count: int, seed: int = 0) -> Path:
    """`count` JPEG crops of the sample photos, resized to `size`, in SHARDS shards."""
    rng = np.random.default_rng(seed)
    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    samples = []
    for index in range(count):
        photo = photos[index % 2]
        top, left = int(rng.integers(0, 427 - 300)), int(rng.integers(0, 640 - 400))
        crop = Image.fromarray(photo[top : top + 300, left : left + 400]).resize(
            size, Image.Resampling.BICUBIC
        )
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        samples.append((f"img{index:06d}", {"jpg": buffer.getvalue(), "cls": str(index % 2).encode()}))
    per_shard = -(-count // SHARDS)
    for shard in range(SHARDS):
        write_shard(
            directory / f"shard-{shard:06d}.tar", samples[shard * per_shard : (shard + 1) * per_shard]
        )
    return directory


def shard_urls(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob("*.tar"))


def naive_rate(directory: Path) -> float:
    """The loop people write first: webdataset's PIL decoding, Pillow resize, numpy patchify."""
    size, patch = CONFIG.image_size, CONFIG.patch_size
    started, count = time.perf_counter(), 0
    for image, _label in (
        wds.WebDataset(shard_urls(directory), shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
    ):
        image = image.convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)))
        grid = size // patch
        patches = (
            pixels.reshape(grid, patch, grid, patch, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
        )
        count += len(patches) > 0
    return count / (time.perf_counter() - started)


def jpeg_payloads(directory: Path) -> list[bytes]:
    payloads = []
    for url in shard_urls(directory):
        with tarfile.open(url) as tar:
            payloads += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return payloads


def decode_rate(directory: Path) -> float:
    """Full JPEG decode alone (bytes already in memory)."""
    payloads = jpeg_payloads(directory)
    started = time.perf_counter()
    for payload in payloads:
        Image.open(io.BytesIO(payload)).load()
    return len(payloads) / (time.perf_counter() - started)


def vitpipe_rate(directory: Path, out: Path) -> float:
    started = time.perf_counter()
    result = preprocess(str(directory), str(out), CONFIG)
    seconds = time.perf_counter() - started
    if result.processed != SHARDS or result.manifest["totals"]["failed"]:
        raise RuntimeError(f"benchmark corpus {directory} did not preprocess cleanly: {result.summary()}")
    return result.manifest["totals"]["samples"] / seconds


def per_call_ms(function, seconds: float = 1.0) -> float:
    function()
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        function()
        calls += 1
    return 1e3 * (time.perf_counter() - started) / calls


def component_times(jpegs: list[bytes]) -> dict[str, float]:
    """The choices inside vitpipe's worker, each against the obvious alternative."""
    large_jpeg = jpegs[0]

    def full_decode_and_resize() -> np.ndarray:
        image = Image.open(io.BytesIO(large_jpeg)).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
        return np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR, box=box))

    square = np.asarray(Image.open(io.BytesIO(large_jpeg)).convert("RGB"))[:, 250:1750]
    pil_square = Image.fromarray(np.ascontiguousarray(square))
    patches = np.stack([patchify(decode.decode_image(jpeg, CONFIG), 16) for jpeg in jpegs[:64]])
    flat = pa.array(patches.reshape(-1))
    nested = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 768), 196)
    binary = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(patches[0].nbytes), len(patches), [None, pa.py_buffer(patches.tobytes())]
    )
    times = {
        "decode_resize_full_ms": per_call_ms(full_decode_and_resize),
        "decode_resize_vitpipe_ms": per_call_ms(lambda: decode.decode_image(large_jpeg, CONFIG)),
        "resize_1500px_to_224_pillow_ms": per_call_ms(
            lambda: pil_square.resize((224, 224), Image.Resampling.BILINEAR)
        ),
        "resize_1500px_to_224_torch_ms": per_call_ms(lambda: decode.fit(square, 224, "squash", "bilinear")),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, column in (("nested_list", nested), ("fixed_binary", binary)):
            path = f"{tmp}/{name}.parquet"
            table = pa.table({"patches": column})
            write = per_call_ms(lambda: pq.write_table(table, path, compression="lz4"), 2.0)  # noqa: B023
            read = per_call_ms(lambda: pq.read_table(path), 2.0)  # noqa: B023
            times[f"parquet_{name}_write_ms_per_image"] = write / len(patches)
            times[f"parquet_{name}_read_ms_per_image"] = read / len(patches)
        table = pa.table({"patches": binary})
        for codec in ("none", "lz4", "zstd"):
            path = f"{tmp}/{codec}.parquet"
            write = per_call_ms(lambda: pq.write_table(table, path, compression=codec), 2.0)  # noqa: B023
            times[f"parquet_{codec}_write_ms_per_image"] = write / len(patches)
            times[f"parquet_{codec}_size_vs_raw"] = Path(path).stat().st_size / patches.nbytes
    return {key: round(value, 3) for key, value in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpora = {name: make_corpus(root / name, size, count) for name, (size, count) in CORPORA.items()}
        components = component_times(jpeg_payloads(corpora["large_2000x1500"]))
        print(components, flush=True)
        rates: dict[str, dict[str, list[float]]] = {name: {} for name in corpora}
        for cpus in (1, 2):
            init_ray(num_cpus=cpus)
            for name, directory in corpora.items():  # warm the workers: imports, first-task costs
                preprocess(str(directory), str(root / f"warm-{cpus}-{name}"), CONFIG)
            for round_index in range(args.rounds):
                for name, directory in corpora.items():
                    runs = rates[name]
                    out = root / f"out-{cpus}-{name}-{round_index}"
                    runs.setdefault(f"vitpipe_{cpus}_worker", []).append(vitpipe_rate(directory, out))
                    if cpus == 1:
                        runs.setdefault("naive", []).append(naive_rate(directory))
                        runs.setdefault("decode_only", []).append(decode_rate(directory))
                    print(name, {key: round(values[-1], 1) for key, values in runs.items()}, flush=True)
            ray.shutdown()
    results: dict = {
        "what": __doc__.split("\n\n")[0],
        "target": {"image_size": 224, "patch_size": 16, "channels": 3, "jpeg_quality": 90},
        "rounds": args.rounds,
        "components_one_core_2000x1500_jpeg": components,
        "corpora": {},
    }
    for name, runs in rates.items():
        median = {key: statistics.median(values) for key, values in runs.items()}
        results["corpora"][name] = {
            "images": CORPORA[name][1],
            "images_per_s_median": {key: round(value, 1) for key, value in median.items()},
            "images_per_s_per_core": {
                "naive": round(median["naive"], 1),
                "decode_only": round(median["decode_only"], 1),
                "vitpipe_1_worker": round(median["vitpipe_1_worker"], 1),
                "vitpipe_2_workers": round(median["vitpipe_2_worker"] / 2, 1),
            },
            "vitpipe_1_worker_vs_naive_per_core": round(median["vitpipe_1_worker"] / median["naive"], 2),
            "vitpipe_scaling_2_vs_1_worker": round(
                median["vitpipe_2_worker"] / median["vitpipe_1_worker"], 2
            ),
            "vitpipe_1_worker_vs_decode_only": round(median["vitpipe_1_worker"] / median["decode_only"], 2),
            "all_rounds": {key: [round(v, 1) for v in values] for key, values in runs.items()},
        }
    print(save("preprocess", results))


if __name__ == "__main__":
    main()
