"""Object storage as users run it: an S3 API served on 127.0.0.1 by moto, reached through the URL's own
query (`?endpoint_override=HOST:PORT&scheme=http`, as for MinIO, Ceph or R2) and through AWS_ENDPOINT_URL,
for preprocessing input and output (a killed run rerun), pretraining data and checkpoints, the export,
and fine-tuning's weights and targets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
import yaml
from moto.server import ThreadedMotoServer

from pipeline.datasets.shards import write_shard
from pipeline.preprocess.manifest import read_manifest
from pipeline.storage import resolve
from tests.conftest import REPO, TINY_RUN, VITPIPE, run_vitpipe
from tests.test_preprocess import photo_crops
from tests.test_preprocess_decode import encode

pytestmark = pytest.mark.slow
BUCKET = "vitpipe"


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[Callable[[str], str], str]]:
    """A moto S3 server on a free port with one bucket: (url(key) with the endpoint in its query, the
    endpoint as AWS_ENDPOINT_URL takes it). Credentials are conftest's dummy ones."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    try:
        yield (lambda key: f"s3://{BUCKET}/{key}{query}"), endpoint
    finally:
        server.stop()


def upload(local: Path, url: str) -> None:
    filesystem, path = resolve(url)
    pafs.copy_files(str(local), path, destination_filesystem=filesystem)


def listing(url: str) -> dict[str, int]:
    filesystem, root = resolve(url)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return {
        os.path.relpath(info.path, root): info.size
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File
    }


def test_preprocess_killed_on_object_storage_resumes_by_query_url_and_by_aws_endpoint_url(s3, tmp_path):
    url, endpoint = s3
    photo = encode(photo_crops(1, (1600, 1200))[0], "JPEG", quality=90)
    corpus = tmp_path / "corpus"
    for shard in range(16):
        write_shard(
            corpus / f"c-{shard:06d}.tar", [(f"s{shard}_{i}", {"jpg": photo, "cls": b"0"}) for i in range(10)]
        )
    upload(corpus, url("corpus"))
    args = [
        "preprocess",
        url("corpus"),
        url("patches"),
        "--image-size",
        "64",
        "--patch-size",
        "16",
        "--workers",
        "1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen([*VITPIPE, *args], env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    while not any(n.endswith(".parquet") for n in listing(url("patches"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The killed driver's Ray workers may still finish the shard in hand: count once the files stop
    # changing (a count taken at once was one short of what the rerun found, now and then).
    done, since = -1, time.monotonic()
    while time.monotonic() - since < 3:
        count = sum(1 for name in listing(url("patches")) if name.endswith(".parquet"))
        if count != done:
            done, since = count, time.monotonic()
        time.sleep(0.3)
    assert 0 < done < 16, done
    assert "_manifest.json" not in listing(url("patches"))

    # The same bucket without the query: the endpoint from AWS_ENDPOINT_URL, as the AWS tools read it.
    plain = [f"s3://{BUCKET}/corpus", f"s3://{BUCKET}/patches"]
    rerun = subprocess.run(
        [*VITPIPE, "preprocess", *plain, *args[3:]],
        env={**env, "AWS_ENDPOINT_URL": endpoint},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{16 - done} now" in rerun.stdout
    manifest = read_manifest(url("patches"))
    assert manifest["splits"]["."]["samples"] == 160
    assert len([name for name in listing(url("patches")) if name.endswith(".parquet")]) == 16


def test_a_job_pretrains_exports_and_fine_tunes_on_object_storage(
    s3, two_nodes, fractal_patches, digits_patches, tmp_path
):
    """Pretraining data, checkpoints (storage_path with the endpoint in its query) and the export in S3;
    fine-tuning reads the exported weights and a target from S3."""
    url, _ = s3
    upload(Path(fractal_patches), url("fractals16"))
    upload(Path(digits_patches), url("digits32"))
    job = {
        "name": "s3job",
        "run_dir": str(tmp_path / "run"),
        "pretrain": {
            **TINY_RUN,
            "data": url("fractals16"),
            "steps": 10,
            "checkpoint_every": 5,
            "storage_path": url("runs"),
        },
        "finetune": {
            "targets": [url("digits32")],
            "modes": ["pretrained"],
            "steps": 5,
            "batch_size": 32,
            "schedule": {"warmup_steps": 1},
            "cpus_per_task": 1.0,
        },
    }
    path = tmp_path / "s3job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = run_vitpipe("run", str(path), "--address", two_nodes.address, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stored = listing(url("runs/s3job"))
    assert {"checkpoint_00000005/vitpipe.json", "checkpoint_00000010/vitpipe.json"} <= set(stored)
    assert "export/vitpipe/model.safetensors" in stored
    assert "export/hf/config.json" in stored
    assert json.loads((tmp_path / "run" / "stages" / "pretrain.json").read_text())["status"] == "done"
    results = json.loads((tmp_path / "run" / "transfer" / "results.json").read_text())["results"]
    assert [(r["target"], r["mode"]) for r in results] == [("digits32", "pretrained")]
    assert "top1" in results[0]
