"""The pretraining data path, measured through `vitpipe pretrain --data-only` (Ray Train workers, each
reading its rows of the run's order from the patch files, the copy to the device), beside its floors and
the loaders users compare with, in one run:

  * stalls: 100,000 16 px images in 1,000 and in 10,000 Parquet files, 2 workers, 3 epochs: the first
    batch's wait and every epoch boundary's; beside the data path before this one (Ray Data
    `read_parquet` + `iter_torch_batches` per epoch, as each Ray Train worker read its shard);
  * feed: 224 px / patch 16 photo patches (150 KB a row), one worker, files read each epoch: steady
    img/s and MB/s per worker and per data CPU, with and without the shuffle window, 1 and 2 threads;
    beside plain pyarrow on one thread (read + zero-copy view + tensor: the floor), Ray Data's
    `iter_torch_batches` with and without its local shuffle buffer, and a JPEG + random-resized-crop
    torch `DataLoader` with the same CPU;
  * the device augmentation's cost per step (random resized crop 256 -> 224, flip, normalise) on this
    machine's CPU (benchmarks/gpu/check.sh measures it on a GPU).

    .venv/bin/python -m benchmarks.bench_ingest          # -> results/ingest.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch
from PIL import Image
from ray.data.collate_fn import ArrowBatchCollateFn
from sklearn.datasets import load_sample_images

from benchmarks.machine import RESULTS, save
from pipeline.config import PreprocessConfig, PretrainConfig
from pipeline.metrics import read_records
from pipeline.patchfile import PatchShardWriter, patches_array
from pipeline.preprocess.manifest import build_manifest, write_manifest
from pipeline.preprocess.shard import ShardReport
from pipeline.pretrain.launch import probe_data
from pipeline.pretrain.plan import plan_pretrain
from pipeline.ray_session import init_ray
from vit.augment import hflip_patches
from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.objective import training_view
from vit.patches import PatchGeometry, patchify
from vit.recipe import BatchSplit, Crop, Optimizer, Recipe, Schedule

RESULTS_NAME = "ingest"
B16_IMAGES_PER_S = 3_000  # what one H100 trains ViT-B/16 at, at good MFU (ANCHORS.md)


# ---------------------------------------------------------------- corpora


def patch_directory(root: Path, files: int, rows: int, geometry: PatchGeometry, images: Any) -> str:
    """A preprocessed split as `vitpipe preprocess` leaves it: `files` patch files of `rows` rows under
    train/, and the manifest; `images(index)` gives each image (uint8 [H, W, C])."""
    config = PreprocessConfig(image_size=geometry.image_size, patch_size=geometry.patch_size)
    (root / "train").mkdir(parents=True, exist_ok=True)
    reports, filesystem = [], pafs.LocalFileSystem()
    for index in range(files):
        name = f"train/part-{index:05d}.parquet"
        writer = PatchShardWriter(filesystem, str(root / name), geometry, f"shard-{index}", "none")
        labels = [(index * rows + row) % 10 for row in range(rows)]
        for row, label in enumerate(labels):
            writer.add(f"{index}-{row}", label, patchify(images(index * rows + row), geometry.patch_size))
        writer.close({"config_hash": config.output_hash()})
        per_class = {str(c): labels.count(c) for c in set(labels)}
        reports.append(ShardReport(source=f"shard-{index}", file=name, samples=rows, per_class=per_class))
    manifest = build_manifest(config, str(root), [str(c) for c in range(10)], reports)
    write_manifest(filesystem, str(root), manifest)
    return str(root)


def photos(size: int) -> Any:
    """Random crops of scikit-learn's two sample photos at `size` px (real photo bytes, no two alike)."""
    bases = load_sample_images().images

    def image(index: int) -> np.ndarray:
        rng = np.random.default_rng(index)
        base = bases[index % 2]
        top, left = rng.integers(0, base.shape[0] - size), rng.integers(0, base.shape[1] - size)
        crop = base[top : top + size, left : left + size]
        return crop[:, ::-1] if index % 4 >= 2 else crop

    return image


def tiny(size: int) -> Any:
    return lambda index: np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- vitpipe's data path (--data-only)


def data_only(
    directory: str,
    runs: Path,
    name: str,
    *,
    patch: int,
    workers: int,
    micro: int,
    steps: int,
    window: int,
    threads: int,
) -> dict[str, Any]:
    """`vitpipe pretrain --data-only` in this process; its per-step records read back."""
    config = PretrainConfig(
        data=directory,
        model={"patch_size": patch, "width": 16, "depth": 1, "heads": 1, "mlp_dim": 32},
        num_workers=workers,
        cpus_per_worker=1.0 / workers,
        global_batch_size=micro * workers,
        micro_batch_size=micro,
        steps=steps,
        shuffle_buffer=window,
        data_threads=threads,
        log_every=10**6,
    )
    plan = plan_pretrain(config, directory)
    started = time.perf_counter()
    out = probe_data(plan, run_dir=str(runs / name), steps=steps)
    wall = time.perf_counter() - started
    records = [r for r in read_records(out) if "images_per_s" in r]
    return summarise(records, plan.steps_per_epoch, wall, threads, window, workers)


def summarise(
    records: list[dict], steps_per_epoch: int, wall: float, threads: int, window: int, workers: int
) -> dict[str, Any]:
    """Steady rates over every step but the first (images over the steps' summed wall time: a batch
    already read ahead costs nothing, so a median step would flatter), and the waits at the epochs' starts."""
    boundaries = [b["data_wait_s"] for a, b in itertools.pairwise(records) if b["epoch"] != a["epoch"]]
    steady = records[1:]
    seconds = sum(r["step_s"] for r in steady)
    per_step = steady[0]["images_per_s"] * steady[0]["step_s"] / workers  # images per worker a step
    per_worker = per_step * len(steady) / seconds
    bytes_per_image = steady[0]["worker_mb_per_s"] / steady[0]["worker_images_per_s"] * 1e6
    return {
        "workers": workers,
        "data_threads": threads,
        "shuffle_window": window,
        "steps": len(records),
        "steps_per_epoch": steps_per_epoch,
        "first_batch_wait_s": records[0]["data_wait_s"],
        "epoch_boundary_wait_s": {"median": statistics.median(boundaries), "max": max(boundaries)}
        if boundaries
        else None,
        "slowest_step_wait_s": max(r["data_wait_s"] for r in steady),
        "steady_images_per_s_per_worker": per_worker,
        "steady_mb_per_s_per_worker": per_worker * bytes_per_image / 1e6,
        "steady_images_per_s_per_data_cpu": per_worker,  # each worker reads inside its one CPU
        "b16_gpus_fed_per_worker": per_worker / B16_IMAGES_PER_S,
        "wall_s_including_ray_train_start": wall,
    }


# ---------------------------------------------------------------- the loaders beside it


def pyarrow_floor(files: list[str], micro: int, epochs: int = 2) -> dict[str, Any]:
    """Plain pyarrow on one thread: read each file, view its patches without a copy, cut tensors."""
    torch.set_num_threads(1)
    images, started = 0, time.perf_counter()
    for _ in range(epochs):
        for file in files:
            table = pq.read_table(file, columns=["patches", "label"], use_threads=False)
            patches = patches_array(table.column("patches"))
            for lo in range(0, len(patches) - micro + 1, micro):
                batch = torch.from_numpy(patches[lo : lo + micro].copy())
                images += batch.shape[0]
    seconds = time.perf_counter() - started
    return {"images_per_s": images / seconds, "threads": 1, "copies": 1}


def ray_data(files: list[str], micro: int, shuffle: int, epochs: int = 2) -> dict[str, Any]:
    """The data path before this one: a Ray Data `read_parquet` executed per epoch, its batches through
    `iter_torch_batches` (with the collation the worker had), with or without the local shuffle buffer."""

    class Collate(ArrowBatchCollateFn):
        def __call__(self, batch):
            patches = patches_array(batch.column("patches"))
            labels = batch.column("label").to_numpy()
            return {"patches": torch.from_numpy(patches.copy()), "labels": torch.from_numpy(labels.copy())}

    dataset = ray.data.read_parquet(files, num_cpus=0.5).select_columns(["patches", "label"])
    firsts, rates = [], []
    for epoch in range(epochs):
        started, first, images = time.perf_counter(), None, 0
        for batch in dataset.iter_torch_batches(
            batch_size=micro,
            drop_last=True,
            collate_fn=Collate(),
            prefetch_batches=2,
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=epoch if shuffle else None,
        ):
            if first is None:
                first = time.perf_counter() - started
                after_first = time.perf_counter()
            images += batch["patches"].shape[0]
        firsts.append(first)
        rates.append((images - micro) / (time.perf_counter() - after_first))
    rate = statistics.median(rates)
    return {
        "first_batch_wait_s_each_epoch": firsts,
        "images_per_s_after_first_batch": rate,
        "local_shuffle_buffer": shuffle,
    }


def jpeg_loader(folder: Path, count: int, micro: int, epochs: int = 2) -> dict[str, Any]:
    """JPEGs decoded and random-resized-cropped to 224 every epoch (PIL), flipped, in a torch DataLoader
    with one worker process: the per-epoch decode path preprocessing exists to avoid."""
    source = photos(400)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.ascontiguousarray(source(index))).save(folder / f"{index}.jpg", quality=90)
    dataset = JpegCrops(sorted(folder.glob("*.jpg")))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=micro, num_workers=1, persistent_workers=True, shuffle=True, drop_last=True
    )
    rates = []
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for batch in loader:
            images += batch.shape[0]
        rates.append(images / (time.perf_counter() - started))
    return {"images_per_s": rates[-1], "workers": 1, "jpeg_px": 400, "quality": 90}


class JpegCrops(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng()
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")
            width, height = image.size
            for _ in range(10):
                area = rng.uniform(0.08, 1.0) * width * height
                ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
                if 0 < w <= width and 0 < h <= height:
                    break
            else:
                w, h = width, height
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            crop = image.resize((224, 224), Image.BILINEAR, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            return torch.from_numpy(np.asarray(crop).copy())


def device_augmentation(micro: int, repeats: int = 5) -> dict[str, Any]:
    """The recipe's crop 256 -> 224 / patch 16, flip and normalisation on a batch, on this CPU."""
    torch.set_num_threads(1)
    model = VisionTransformer(
        ViTConfig(image_size=224, patch_size=16, num_classes=10, width=16, depth=1, heads=1, mlp_dim=32)
    )
    stored = torch.randint(0, 256, (micro, 256, 768), dtype=torch.uint8)
    recipe = Recipe(Optimizer(), Schedule(), 1, BatchSplit(micro, micro), crop=Crop(), input_size=256)
    geometry = model.config.geometry

    def timed(function: Any) -> float:
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds) * 1e3

    cropped = training_view(stored, geometry, recipe)
    pixels = stored[:, :196].contiguous()  # uint8 patches at the model's size (no crop)
    stem = model.stem
    return {
        "micro_batch": micro,
        "threads": 1,
        "inception_crop_and_flip_ms": timed(lambda: training_view(stored, geometry, recipe)),
        "flip_uint8_ms_when_not_cropping": timed(lambda: hflip_patches(stored[:, :196], geometry)),
        "normalise_uint8_ms": timed(lambda: stem.normalize(pixels)),
        # the normalisation before this tree, three passes: convert, scale, shift
        "normalise_uint8_three_passes_ms_before": timed(lambda: pixels.float() * stem.scale + stem.shift),
        "normalise_float_pixels_ms": timed(lambda: stem.normalize(cropped)),
        "uint8_to_float_ms": timed(lambda: pixels.float()),
    }


# ---------------------------------------------------------------- entry point


def stall_section(root: Path, runs: Path, images: int, ray_data_files: int) -> dict[str, Any]:
    geometry = PatchGeometry(16, 4, 3)
    out: dict[str, Any] = {}
    for files in (1_000, 10_000):
        started = time.perf_counter()
        directory = patch_directory(root / f"stall-{files}", files, images // files, geometry, tiny(16))
        print(f"bench_ingest: {images:,} images in {files:,} files ({time.perf_counter() - started:.0f} s)")
        steps = 3 * (images // 256)
        listed = sorted(str(p) for p in Path(directory, "train").glob("*.parquet"))
        out[f"{files}_files"] = {
            "vitpipe_data_only": data_only(
                directory,
                runs,
                f"stall-{files}",
                patch=4,
                workers=2,
                micro=128,
                steps=steps,
                window=2048,
                threads=2,
            ),
        }
        if files <= ray_data_files:
            out[f"{files}_files"]["ray_data_per_epoch_before"] = ray_data(listed, 128, 0)
        else:  # seen here: after 12 minutes its first epoch had not given a first batch
            out[f"{files}_files"]["ray_data_per_epoch_before"] = f"not run above {ray_data_files} files"
        print(f"bench_ingest: {files} files: {out[f'{files}_files']}")
    return out


def feed_section(root: Path, runs: Path, rows: int, micro: int) -> dict[str, Any]:
    geometry = PatchGeometry(224, 16, 3)
    directory = patch_directory(root / "photos224", 20, rows // 20, geometry, photos(224))
    listed = sorted(str(p) for p in Path(directory, "train").glob("*.parquet"))
    steps = 3 * (rows // micro)
    runs_out = {
        f"window_{window}_threads_{threads}": data_only(
            directory,
            runs,
            f"feed-{window}-{threads}",
            patch=16,
            workers=1,
            micro=micro,
            steps=steps,
            window=window,
            threads=threads,
        )
        for window, threads in ((2048, 2), (0, 2), (2048, 1))
    }
    for name, run in runs_out.items():
        print(f"bench_ingest: 224 px {name}: {run['steady_images_per_s_per_worker']:,.0f} img/s per worker")
    return {
        "rows": rows,
        "micro_batch": micro,
        "row_bytes": geometry.sample_bytes,
        "vitpipe_data_only": runs_out,
        "pyarrow_floor_one_thread": pyarrow_floor(listed, micro),
        "ray_data_iter_torch_batches": {
            "no_local_shuffle": ray_data(listed, micro, 0),
            "local_shuffle_2048": ray_data(listed, micro, 2048),
        },
        "jpeg_random_resized_crop_dataloader": jpeg_loader(root / "jpeg", 1024, micro),
        "device_augmentation_cpu": device_augmentation(micro),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="16 px images of the stall corpora")
    parser.add_argument("--rows", type=int, default=4_000, help="224 px rows of the feed corpus")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument(
        "--ray-data-files",
        type=int,
        default=1_000,
        help="the Ray Data baseline up to this many files (at 10,000 it ran past 12 minutes)",
    )
    parser.add_argument(
        "--only-device-augmentation",
        action="store_true",
        help="rerun that section alone into the existing results (no Ray)",
    )
    args = parser.parse_args()

    if args.only_device_augmentation:
        # The section carries its own time; the file keeps the full run's time and machine.
        path = RESULTS / f"{RESULTS_NAME}.json"
        results = json.loads(path.read_text())
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        section = {"when": stamp, **device_augmentation(args.micro_batch)}
        results["feed_224px"]["device_augmentation_cpu"] = section
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(section, indent=2))
        return

    print(init_ray())
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as scratch:
        root = Path(scratch)
        results = {
            "feed_224px": feed_section(root, root / "runs", args.rows, args.micro_batch),
            "stalls_16px": stall_section(root, root / "runs", args.images, args.ray_data_files),
        }
    print(save(RESULTS_NAME, results))


if __name__ == "__main__":
    main()
