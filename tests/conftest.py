"""Shared fixtures: one local Ray for the whole session, and the embedded datasets built once."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import torch.distributed as dist
import yaml
from ray.cluster_utils import Cluster

from pipeline import ray_session
from pipeline.cli import main
from pipeline.config import DigitsConfig, FractalsConfig, PreprocessConfig
from pipeline.datasets.digits import build_digits
from pipeline.datasets.fractals import build_fractals
from pipeline.preprocess.run import preprocess
from pipeline.ray_session import init_ray

REPO = Path(__file__).resolve().parents[1]

# Dummy credentials for the S3 API the object-storage tests serve on 127.0.0.1 (moto), set before any
# Ray starts so that its workers inherit them; no instance-metadata lookups.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": "us-east-1",
}
for _name, _value in S3_TEST_ENV.items():
    os.environ.setdefault(_name, _value)

VITPIPE = [sys.executable, "-m", "pipeline.cli"]

# Fixtures that start a multi-node cluster or a Ray Train group: a test that uses one is slow (part of
# `make test` only, not of `make test-fast`), whatever its own body costs.
SLOW_FIXTURES = frozenset({"two_nodes", "zero2_run", "pretrained_export", "token_cluster"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, started once for every test that needs one."""
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("datasets") / "digits"
    build_digits(DigitsConfig(shard_size=400), out)
    return out


FRACTALS = FractalsConfig(classes=10, per_class=30, size=32, shard_size=64, seed=7)


@pytest.fixture(scope="session")
def fractals_dir(ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("datasets") / "fractals"
    build_fractals(FRACTALS, out)
    return out


def preprocess_to(source: Path, out: Path, **settings) -> str:
    """Preprocess a dataset's shards with the given PreprocessConfig settings; returns the output folder."""
    preprocess(str(source), str(out), PreprocessConfig(**settings))
    return str(out)


@pytest.fixture(scope="session")
def digits_patches(digits_dir, tmp_path_factory) -> str:
    """Digits as 32px RGB images in 4px patches: the transfer target of the tests."""
    return preprocess_to(
        digits_dir, tmp_path_factory.mktemp("patches") / "digits", image_size=32, patch_size=4
    )


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int):
    """A head and a worker node on this machine (`ray.cluster_utils.Cluster`); this process does not join."""
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def two_nodes(ray_local):
    """A head and a worker node, two logical CPUs each (one per training worker and the drivers): the
    pretraining tests' cluster. Started by the first of them, `zero2_run`, and always after this process's
    own local Ray: started the other way round, the CLI's drivers on the cluster failed in Ray Data
    (OwnerDiedError) or hung (this session's Ray becomes the machine's "latest" instance, which parts of
    Ray Train look up)."""
    with two_node_cluster(cpus_per_node=2) as cluster:
        yield cluster


def run_vitpipe(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process, as a user would."""
    kwargs.setdefault("timeout", 300)
    return subprocess.run([*VITPIPE, *args], capture_output=True, text=True, cwd=REPO, **kwargs)


@pytest.fixture
def cli_before_ray(monkeypatch, capsys):
    """The CLI called in this process, for commands that must be refused before Ray: every binding of
    `connect_ray`/`init_ray` is replaced by one that notes the call and fails it, and the test fails if
    one was called (in this process the session's Ray may be up: a command joining it would print
    nothing). Returns run(*args) -> (exit code, stderr)."""
    calls: list[str] = []

    def reached(*args, **kwargs):
        calls.append("Ray")
        raise RuntimeError("cli_before_ray: the command reached Ray")

    originals = {name: getattr(ray_session, name) for name in ("connect_ray", "init_ray")}
    for module in list(sys.modules.values()):
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, reached)

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        stderr = capsys.readouterr().err
        assert not calls, f"vitpipe {' '.join(args)} started or joined Ray before refusing: {stderr[-2000:]}"
        return code, stderr

    return run


# A pretraining run small enough for a test: a two-block ViT, 80 steps on two workers with ZeRO-2.
TINY_RUN = {
    "model": {"variant": "Ti/4", "width": 64, "depth": 2, "heads": 2, "mlp_dim": 128},
    "num_workers": 2,
    "cpus_per_worker": 1.0,
    "placement": "SPREAD",
    "global_batch_size": 32,
    "micro_batch_size": 16,
    "steps": 80,
    "zero_stage": 2,
    "optimizer": {"lr": 3.0e-3, "weight_decay": 0.05},
    "schedule": {"warmup_steps": 8, "decay": "cosine"},
    "flip": False,
    "shuffle_buffer": 64,
    "checkpoint_every": 20,
    "log_every": 5,
}


# A valid pipeline config that tests mutate one key at a time.
GOOD_JOB = """
name: quick
datasets:
  corpus: {kind: fractals, classes: 10, per_class: 100, size: 32}
  digits: {kind: digits}
preprocess:
  corpus: {image_size: 32, patch_size: 4}
  digits: {image_size: 32}
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


@pytest.fixture(scope="session")
def one_rank_group():
    """A one-process gloo group with the variables Ray Train sets, for DeepSpeed engines in this process
    (on DeepSpeed's CPU accelerator, as in the Ray Train workers here). One per session: DeepSpeed
    caches the group it first sees, so a destroyed and re-created group would break later engines."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    variables = {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def fractal_patches(fractals_dir, tmp_path_factory) -> str:
    """The fractal corpus as 16px images in 4px patches: what the pretraining tests train on."""
    return preprocess_to(
        fractals_dir, tmp_path_factory.mktemp("patches") / "fractals16", image_size=16, patch_size=4
    )


@pytest.fixture(scope="session")
def zero2_run(two_nodes, fractal_patches, tmp_path_factory) -> Path:
    """`vitpipe pretrain` of TINY_RUN: ZeRO-2 on two Ray Train workers on two nodes. Its export is kept
    aside at once (`pretrained_export`) for the transfer tests, before the pretraining tests resume it."""
    runs = tmp_path_factory.mktemp("runs")
    config = runs / "zero2.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "data": fractal_patches}))
    result = run_vitpipe(
        "pretrain", str(config), "--storage", str(runs), "--address", two_nodes.address, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrained 80 steps" in result.stdout
    shutil.copytree(runs / "zero2" / "export", runs / "zero2-step80-export")
    return runs / "zero2"


@pytest.fixture(scope="session")
def pretrained_export(zero2_run) -> Path:
    """The vitpipe weights exported at the end of `zero2_run` (step 80, two ranks)."""
    return zero2_run.parent / "zero2-step80-export" / "vitpipe"


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts served by it); its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    command = [
        mlflow,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    log = (root / "server.log").open("w")
    # Without MLflow's job runner (a dozen worker processes for its GenAI jobs, which vitpipe never uses).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"

    for _ in range(240):
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:  # noqa: S310 (localhost)
                break
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        time.sleep(0.25)
    yield uri
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()
