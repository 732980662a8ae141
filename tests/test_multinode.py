"""Dataset generation on a simulated two-node Ray cluster, reached the way users reach one: --address."""

from __future__ import annotations

import os
import re

import pytest

from pipeline.config import PreprocessConfig
from pipeline.datasets.card import read_card
from pipeline.preprocess.run import preprocess
from tests.conftest import run_vitpipe, two_node_cluster


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node on this machine, one CPU each."""
    with two_node_cluster(cpus_per_node=1) as cluster:
        yield cluster


def test_info_sees_both_nodes(two_nodes):
    result = run_vitpipe("info", "--address", two_nodes.address)
    assert result.returncode == 0, result.stderr
    assert "2 node(s), 2 CPU" in result.stdout


def test_fractals_generated_across_nodes_match_a_local_run(two_nodes, tmp_path):
    # Shards of about two seconds each (128 px). Ray hands a node's idle worker the next queued task, so
    # shorter shards (60 images at 32 px, 0.3 s) all finished on the first node while the second node's
    # worker process was still starting.
    args = ["--classes", "4", "--per-class", "30", "--size", "128", "--shard-size", "30", "--seed", "11"]
    remote = run_vitpipe(
        "datasets", "fractals", str(tmp_path / "cluster"), *args, "--address", two_nodes.address
    )
    assert remote.returncode == 0, remote.stderr
    assert "2 node(s), 2 CPU" in remote.stderr
    assert re.search(r"4/4 shards, .* done in .* on 2 node\(s\)", remote.stderr)  # both nodes, not one
    local = run_vitpipe(
        "datasets", "fractals", str(tmp_path / "local"), *args, env={"RAY_ADDRESS": "", **_env()}
    )
    assert local.returncode == 0, local.stderr
    cluster_card, local_card = read_card(tmp_path / "cluster"), read_card(tmp_path / "local")
    assert cluster_card["splits"]["train"]["samples"] == 120
    for ours, theirs in zip(
        cluster_card["splits"]["train"]["shards"], local_card["splits"]["train"]["shards"], strict=True
    ):
        assert (tmp_path / "cluster" / ours["file"]).read_bytes() == (
            tmp_path / "local" / theirs["file"]
        ).read_bytes()


def test_unreachable_address_is_a_clear_error(tmp_path):
    out = tmp_path / "never-written"
    result = run_vitpipe("datasets", "digits", str(out), "--address", "127.0.0.1:1", timeout=120)
    assert result.returncode == 1
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in result.stderr
    dashboard = run_vitpipe("info", "--address", "http://127.0.0.1:1", timeout=120)
    assert "http://127.0.0.1:1 is a dashboard's address" in dashboard.stdout  # not a name lookup's error
    assert not out.exists()


def _env() -> dict[str, str]:
    return dict(os.environ)


def test_preprocess_across_nodes_matches_a_local_run(two_nodes, digits_dir, tmp_path):
    remote = run_vitpipe(
        "preprocess",
        str(digits_dir),
        str(tmp_path / "cluster"),
        "--image-size",
        "16",
        "--patch-size",
        "4",
        "--address",
        two_nodes.address,
    )
    assert remote.returncode == 0, remote.stderr
    assert "2 node(s), 2 CPU" in remote.stderr
    assert "preprocessed 5 shard(s): 5 now" in remote.stdout
    assert re.search(r"5/5 shards, .* done in .* on 2 node\(s\)", remote.stderr)  # both nodes, not one
    preprocess(str(digits_dir), str(tmp_path / "local"), PreprocessConfig(image_size=16, patch_size=4))
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert len(files) == 6  # five patch files and the manifest
    for name in files:
        assert (tmp_path / "cluster" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
