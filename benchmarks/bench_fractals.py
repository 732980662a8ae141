"""Fractal corpus generation rate: images/s per core, and how it scales with Ray workers.

Measures (a) the pure render+JPEG core on one core at several sizes, and (b) the whole
`build_fractals` (Ray tasks, tar writing) on a local Ray with 1 and then 2 CPUs, side by side.

    .venv/bin/python -m benchmarks.bench_fractals
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.machine import save
from pipeline.config import FractalsConfig
from pipeline.datasets.fractals import build_fractals, encode_jpeg, render_instance, sample_class
from pipeline.ray_session import init_ray


def core_rate(size: int, images: int, repeats: int = 3) -> float:
    """Images/s of render + JPEG encode on one core (median of `repeats`)."""
    systems = [sample_class(0, c, 2, 4) for c in range(10)]
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(images):
            encode_jpeg(render_instance(systems[i % 10], 0, i % 10, i, size, 0.1), 90)
        rates.append(images / (time.perf_counter() - started))
    return statistics.median(rates)


def ray_rate(cpus: int, config: FractalsConfig) -> float:
    """Images/s of the whole Ray build on a fresh local Ray with `cpus` CPUs."""
    init_ray(num_cpus=cpus)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            build_fractals(config, Path(tmp) / "out")
            return config.classes * config.per_class / (time.perf_counter() - started)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000, help="images per Ray build")
    args = parser.parse_args()
    core = {size: core_rate(size, images=max(20, 200 * 32 * 32 // (size * size))) for size in (32, 64, 224)}
    config = FractalsConfig(classes=20, per_class=args.images // 20, size=32, shard_size=100)
    scaling = {cpus: ray_rate(cpus, config) for cpus in (1, 2)}
    results = {
        "what": "FractalDB-style corpus generation: render (chaos game) + JPEG encode + tar write",
        "core_images_per_s_one_core": {f"{size}px": round(rate, 1) for size, rate in core.items()},
        "ray_build_images_per_s_32px": {f"{cpus}_cpu": round(rate, 1) for cpus, rate in scaling.items()},
        "ray_scaling_2_vs_1_cpu": round(scaling[2] / scaling[1], 2),
        "images_per_ray_build": config.classes * config.per_class,
    }
    print(f"results: {save('fractals', results)}")
    for key, value in results.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
