"""Shared fixtures: one local Ray for the whole session, and the embedded datasets built once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray

from pipeline.config import DigitsConfig, FractalsConfig
from pipeline.ray_session import init_ray

REPO = Path(__file__).resolve().parents[1]
VITPIPE = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, started once for every test that needs one."""
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(ray_local, tmp_path_factory) -> Path:
    from pipeline.datasets.digits import build_digits

    out = tmp_path_factory.mktemp("datasets") / "digits"
    build_digits(DigitsConfig(shard_size=400), out)
    return out


FRACTALS = FractalsConfig(classes=10, per_class=30, size=32, shard_size=64, seed=7)


@pytest.fixture(scope="session")
def fractals_dir(ray_local, tmp_path_factory) -> Path:
    from pipeline.datasets.fractals import build_fractals

    out = tmp_path_factory.mktemp("datasets") / "fractals"
    build_fractals(FRACTALS, out)
    return out


def run_vitpipe(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process, as a user would."""
    kwargs.setdefault("timeout", 300)
    return subprocess.run([*VITPIPE, *args], capture_output=True, text=True, cwd=REPO, **kwargs)


# A valid pipeline config that tests mutate one key at a time.
GOOD_JOB = """
name: quick
datasets:
  corpus: {kind: fractals, classes: 10, per_class: 100, size: 32}
  digits: {kind: digits}
preprocess:
  corpus: {image_size: 32, patch_size: 4}
pretrain:
  data: corpus
  model: {variant: Ti/4, width: 96, depth: 4, heads: 3, mlp_dim: 384}
  num_workers: 2
  global_batch_size: 128
  micro_batch_size: 32
  zero_stage: 2
  optimizer: {lr: 1e-3, weight_decay: 0.05}
finetune:
  targets: [digits]
"""
