"""The cluster definitions in cluster/ and the paper-scale recipes in jobs/: launcher configs valid
against the schema Ray ships, KubeRay manifests with the fields KubeRay and vitpipe need, the image
pinned to the versions the suite runs, and recipes that carry the paper's settings."""

from __future__ import annotations

import json
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from pipeline.config import load_config
from pipeline.runner.layout import run_layout
from pipeline.runner.plan import plan_job
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
IMAGE = re.compile(r"^[\w.\-/]+:[\w.\-]+$")


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # a CPU head that runs no tasks
    workers = [node for name, node in nodes.items() if name != config["head_node_type"]]
    assert workers
    for node in workers:
        assert node["max_workers"] >= 1
        text = json.dumps(node["node_config"])
        assert "spot" in text.lower()  # spot / SPOT provisioning
        assert re.search(r"p5\.|p4d\.|a2-|a3-|guestAccelerators", text)  # a GPU machine type


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_pins_the_image_shares_storage_and_turns_on_token_auth(path):
    config = yaml.safe_load(path.read_text())
    image = config["docker"]["image"]
    assert IMAGE.match(image)
    assert not image.endswith(":latest")
    assert f"ray{ray.__version__}" in image
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert any(
        "/mnt/shared" in command and "mount" in command for command in config["initialization_commands"]
    )
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in command for command in commands)
    # no token in the repo; the spot-notice handler, started after `ray start` on every worker
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token",
                                     "/home/ray/spot-notice.sh": "./cluster/spot-notice.sh"}  # fmt: skip
    assert any("spot-notice.sh" in command for command in config["worker_start_ray_commands"])


def test_a_broken_launcher_config_is_caught_by_the_schema():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    del config["available_node_types"]["head"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        jsonschema.validate(config, ray_schema())


def kuberay(name: str) -> dict:
    documents = list(yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()))
    assert len(documents) == 1
    return documents[0]


def _check_cluster_spec(spec: dict) -> None:
    """What KubeRay requires of a RayCluster spec, and what vitpipe needs of it."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = [head["template"]["spec"]] + [group["template"]["spec"] for group in spec["workerGroupSpecs"]]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        # a deleted worker pod drains its Ray node first, within its grace period (elastic pretraining)
        pre_stop = " ".join(_container(group)["lifecycle"]["preStop"]["exec"]["command"])
        assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in pre_stop
        assert (
            int(pre_stop.split("--deadline-remaining-seconds ")[1].split()[0])
            < group["template"]["spec"]["terminationGracePeriodSeconds"]
        )
    gpu_groups = [
        g for g in spec["workerGroupSpecs"] if _container(g)["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu_groups
    for pod in groups:
        container = pod["containers"][0]
        assert container["name"]
        assert IMAGE.match(container["image"])
        assert f"ray{ray.__version__}" in container["image"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # noqa: S108
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == "vitpipe-shared"


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_kuberay_raycluster_has_the_required_fields():
    manifest = kuberay("raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    _check_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_runs_a_recipe_on_the_shared_volume():
    manifest = kuberay("rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    words = spec["entrypoint"].split()
    assert words[:4] == ["python", "-m", "pipeline.cli", "run"]
    job = REPO / words[4]
    load_config(job)  # the job it runs exists and validates
    assert words[words.index("--run-dir") + 1].startswith("/mnt/shared/")
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_kuberay_shared_volume_is_read_write_many():
    claim = kuberay("shared-storage.yaml")
    assert (claim["kind"], claim["metadata"]["name"]) == ("PersistentVolumeClaim", "vitpipe-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dockerfile_pins_the_versions_the_suite_runs():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE).group(1)
    assert ":" in base
    assert not base.endswith(":latest")
    pins = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", text, re.MULTILINE))
    assert pins == {
        "TORCH": version("torch").split("+")[0],
        "RAY": version("ray"),
        "DEEPSPEED": version("deepspeed"),
    }
    for package in ("torch", "deepspeed", "ray[data,train,default]"):
        assert f'"{package}==${{' in text  # installed at the pinned version


def recipe(name: str):
    return load_config(REPO / "jobs" / name)


@pytest.mark.parametrize(("name", "variant"), [("vit_b16_i21k.yaml", "B/16"), ("vit_l16_i21k.yaml", "L/16")])
def test_paper_recipes_carry_the_papers_settings(name, variant):
    job = recipe(name)
    pretrain, finetune = job.pretrain, job.finetune
    assert pretrain.model.variant == variant
    assert pretrain.global_batch_size == 4096
    assert (pretrain.optimizer.name, pretrain.optimizer.betas) == ("adamw", (0.9, 0.999))
    assert (pretrain.optimizer.lr, pretrain.optimizer.weight_decay, pretrain.optimizer.grad_clip) == (
        1e-3,
        0.03,
        1.0,
    )
    assert pretrain.schedule.warmup_steps == 10_000
    # stored at 256, trained on the paper's random crops at 224
    assert (job.preprocess[pretrain.data].image_size, pretrain.image_size) == (256, 224)
    assert (pretrain.crop.area, pretrain.crop.aspect) == ((0.08, 1.0), (0.75, 1.333))
    assert pretrain.use_gpu
    assert (finetune.optimizer.name, finetune.optimizer.momentum, finetune.optimizer.weight_decay) == (
        "sgd",
        0.9,
        0,
    )
    assert finetune.batch_size == 512
    assert finetune.optimizer.grad_clip == 1.0
    for target in finetune.targets:
        assert job.preprocess[target].image_size == 384
        assert job.preprocess[target].patch_size == 16
    plan = plan_job(job, name, run_layout(job))
    assert plan.layout.root.startswith("/mnt/shared/")  # a run folder every node sees
    assert job.evaluate.shots == (1, 5, 10, 25)


def test_make_runs_every_target_with_the_venvs_tools_first_on_path():
    """DeepSpeed compiles its CPU ops with the first `ninja` on PATH; the venv's and the system's sharing one
    build cache rebuilt the op each time the other had run. `make` puts the venv's bin first, as
    cluster/local.sh does for its nodes."""
    shown = subprocess.run(["make", "-np", "lint"], cwd=REPO, capture_output=True, text=True, timeout=60)
    path = next(line for line in shown.stdout.splitlines() if line.startswith("PATH := "))
    assert path.removeprefix("PATH := ").split(":")[0] == str(REPO / ".venv" / "bin")
    script = (REPO / "cluster" / "local.sh").read_text()
    assert 'export PATH="$BIN:$PATH"' in script
