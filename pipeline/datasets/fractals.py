"""A FractalDB-style synthetic pretraining corpus (Kataoka et al., ACCV 2020): formula-driven images.

Each class is a random iterated function system (IFS): 2..8 contractive affine maps of the plane,
kept only if its attractor fills enough of the frame to be a shape rather than a line or a dot.
Each instance renders that system with its parameters jittered, in its own colour, by the chaos
game. Every random choice comes from a generator seeded by (seed, class) or (seed, class,
instance), so the corpus is the same however it is split into shards or spread over workers.
"""

from __future__ import annotations

import colorsys
import io
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from pipeline.config import FractalsConfig
from pipeline.datasets.card import prepare_output_dir, split_entry, write_card
from pipeline.datasets.shards import ShardResult, shard_name, write_shard
from pipeline.ray_tasks import run_shard_tasks

_CLASS_STREAM, _INSTANCE_STREAM, _ORDER_STREAM = 0, 1, 2
MIN_FILL = 0.12  # fraction of a 64x64 frame an attractor must cover to make a class
CHAINS = 512  # chaos-game points advanced together; each one is an independent walk
WARMUP = 16  # steps before a walk is on the attractor (contraction makes this plenty)
CLASSES_PER_TASK = 256
POINTS_PER_PIXEL = 10  # dense enough for a smooth log-density render


@dataclass(frozen=True)
class IFS:
    """An iterated function system: maps x -> A[k] x + b[k], chosen with probability p[k]."""

    A: np.ndarray  # [k, 2, 2]
    b: np.ndarray  # [k, 2]
    p: np.ndarray  # [k]


def _weights(A: np.ndarray) -> np.ndarray:
    """Map probabilities proportional to |det A| (area), the usual choice for an even density."""
    area = np.abs(np.linalg.det(A)) + 1e-3
    return area / area.sum()


def chaos_game(ifs: IFS, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """Points on the attractor, [n, 2], from CHAINS parallel walks."""
    steps = WARMUP + -(-n_points // CHAINS)
    cumulative = np.cumsum(ifs.p)
    choices = np.minimum(np.searchsorted(cumulative, rng.random((steps, CHAINS))), len(ifs.p) - 1)
    points = rng.uniform(-1, 1, (CHAINS, 2))
    kept = np.empty((steps - WARMUP, CHAINS, 2))
    for step in range(steps):
        k = choices[step]
        points = np.einsum("nij,nj->ni", ifs.A[k], points) + ifs.b[k]
        if step >= WARMUP:
            kept[step - WARMUP] = points
    return kept.reshape(-1, 2)[:n_points]


def density(points: np.ndarray, size: int, margin: float = 0.06) -> np.ndarray:
    """Hit counts on a size x size grid, the attractor scaled to fill the frame (aspect kept)."""
    low, high = points.min(axis=0), points.max(axis=0)
    span = max(float((high - low).max()), 1e-9)
    usable = size * (1 - 2 * margin)
    offset = (size - usable * (high - low) / span) / 2
    pixels = ((points - low) / span * (usable - 1) + offset).astype(np.int64)
    pixels = np.clip(pixels, 0, size - 1)
    flat = np.bincount(pixels[:, 1] * size + pixels[:, 0], minlength=size * size)
    return flat.reshape(size, size).astype(np.float64)


def sample_class(seed: int, class_id: int, min_maps: int, max_maps: int) -> IFS:
    """The IFS of one class: the first random contractive system whose attractor fills the frame."""
    rng = np.random.default_rng([seed, _CLASS_STREAM, class_id])
    while True:
        k = int(rng.integers(min_maps, max_maps + 1))
        A = rng.uniform(-1, 1, (k, 2, 2))
        b = rng.uniform(-1, 1, (k, 2))
        if np.linalg.svd(A, compute_uv=False).max() >= 0.95:
            continue  # not contractive enough: no compact attractor, or a smeared one
        ifs = IFS(A, b, _weights(A))
        fill = np.count_nonzero(density(chaos_game(ifs, 20_000, rng), 64)) / 64**2
        if fill >= MIN_FILL:
            return ifs


def sample_classes(seed: int, class_ids: list[int], min_maps: int, max_maps: int) -> list[IFS]:
    """Ray task body: the IFS of several classes (cheap, but many thousands add up on one driver)."""
    return [sample_class(seed, c, min_maps, max_maps) for c in class_ids]


def render_instance(
    ifs: IFS, seed: int, class_id: int, instance: int, size: int, jitter: float
) -> np.ndarray:
    """One instance as uint8 RGB [size, size, 3]: jittered parameters, its own hue, log density."""
    rng = np.random.default_rng([seed, _INSTANCE_STREAM, class_id, instance])
    A = ifs.A * (1 + jitter * rng.standard_normal(ifs.A.shape))
    scale = np.linalg.svd(A, compute_uv=False).max(axis=1)
    A = A / np.maximum(scale / 0.95, 1)[:, None, None]  # keep every map contractive
    b = ifs.b * (1 + jitter * rng.standard_normal(ifs.b.shape))
    points = chaos_game(IFS(A, b, _weights(A)), n_points=size * size * POINTS_PER_PIXEL, rng=rng)
    hits = density(points, size)
    intensity = np.log1p(hits) / max(np.log1p(hits.max()), 1e-9)
    hue = rng.random()
    bright = np.array(colorsys.hsv_to_rgb(hue, 0.6, 1.0))
    dark = np.array(colorsys.hsv_to_rgb((hue + 0.15) % 1, 0.9, 0.55))
    t = intensity[..., None]
    rgb = np.where(t > 0, dark + (bright - dark) * t, 0.0) * np.clip(0.35 + t, 0, 1)
    return np.rint(rgb * 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def sample_key(class_id: int, instance: int) -> str:
    return f"c{class_id:06d}_i{instance:06d}"


def write_fractal_shard(
    systems: list[IFS], config: FractalsConfig, out: str, index: int, members: np.ndarray
) -> ShardResult:
    """Ray task body: render and write one shard; `members` holds flat ids class * per_class + instance."""
    relative = f"train/{shard_name(config.name, index)}"
    classes = [int(m) // config.per_class for m in members]

    def samples():
        for member, class_id in zip(members, classes, strict=True):
            instance = int(member) % config.per_class
            image = render_instance(
                systems[class_id], config.seed, class_id, instance, config.size, config.jitter
            )
            payload = {"jpg": encode_jpeg(image, config.jpeg_quality), "cls": str(class_id).encode()}
            yield sample_key(class_id, instance), payload

    count, size = write_shard(Path(out) / relative, samples())
    return ShardResult(relative, count, size, dict(Counter(classes)))


def sample_order(config: FractalsConfig) -> np.ndarray:
    """All sample ids in a seeded random order, so every shard mixes classes (streaming needs it)."""
    total = config.classes * config.per_class
    return np.random.default_rng([config.seed, _ORDER_STREAM]).permutation(total)


def build_fractals(config: FractalsConfig, out: Path, overwrite: bool = False) -> Path:
    """Write the corpus as one `train` split of shards under `out`; return the dataset.json path."""
    prepare_output_dir(out, overwrite)
    started = time.perf_counter()
    class_chunks = [
        (list(range(c, min(c + CLASSES_PER_TASK, config.classes))),)
        for c in range(0, config.classes, CLASSES_PER_TASK)
    ]
    systems = [ifs for chunk in _run_class_tasks(config, class_chunks) for ifs in chunk]
    order = sample_order(config)
    shards = [
        (str(out), i, order[start : start + config.shard_size])
        for i, start in enumerate(range(0, len(order), config.shard_size))
    ]
    results = run_shard_tasks(write_fractal_shard, shards, label=config.name, shared=(systems, config))
    seconds = time.perf_counter() - started
    return write_card(
        out,
        {
            "name": config.name,
            "kind": "fractals",
            "classes": [f"fractal_{c:06d}" for c in range(config.classes)],
            "image": {"extension": "jpg", "width": config.size, "height": config.size, "mode": "RGB"},
            "splits": {"train": split_entry("train", config.name, results)},
            "config": config.model_dump(mode="json"),
            "config_hash": config.digest(),
            "skipped": [],
            "skipped_count": 0,
            "seconds": round(seconds, 2),
            "images_per_second": round(len(order) / seconds, 1),
        },
    )


def _run_class_tasks(config: FractalsConfig, chunks: list[tuple[list[int]]]) -> list[list[IFS]]:
    remote = ray.remote(num_cpus=1)(sample_classes)
    refs = [remote.remote(config.seed, ids, config.min_maps, config.max_maps) for (ids,) in chunks]
    return ray.get(refs)
