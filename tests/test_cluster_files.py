"""The cluster definitions in cluster/ and the paper-scale recipes in jobs/: launcher configs valid
against the schema Ray ships, KubeRay manifests with the fields KubeRay and vitpipe need, the image
pinned to the versions the suite runs, the fabric NCCL needs between GPU nodes (EFA on AWS, GPUDirect-TCPX(O)
on GCP), pods that fit the machines they name, and recipes that carry the paper's settings."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

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
    assert config["file_mounts"] == {
        "/home/ray/.ray/auth_token": "~/.ray/auth_token",
        "/home/ray/spot-notice.sh": "./cluster/spot-notice.sh",
    }
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
    assert {name: pins[name] for name in ("TORCH", "RAY", "DEEPSPEED")} == {
        "TORCH": version("torch").split("+")[0],
        "RAY": version("ray"),
        "DEEPSPEED": version("deepspeed"),
    }
    for package in ("torch", "deepspeed", "ray[data,train,default]"):
        assert f'"{package}==${{' in text  # installed at the pinned version


# --- The fabric between GPU nodes, and pods that fit their machines ---------------------------------------


@dataclass(frozen=True)
class Machine:
    """A node: vCPUs, memory in GiB, GPUs, and its fabric (EFA devices on EC2, GPU NICs on GCE)."""

    vcpus: int
    memory_gib: int
    gpus: int = 0
    fabric: int = 0


# EC2 instance types (vCPU, GiB, GPUs, EFA network cards) and GCE machine types (vCPU, GB, GPUs, GPU NICs
# besides the first), from the clouds' own tables.
EC2 = {
    "p5.48xlarge": Machine(192, 2048, gpus=8, fabric=32),
    "p4d.24xlarge": Machine(96, 1152, gpus=8, fabric=4),
    "m6i.4xlarge": Machine(16, 64),
}
GCE = {
    "a3-highgpu-8g": Machine(208, 1872, gpus=8, fabric=4),  # GPUDirect-TCPX
    "a3-megagpu-8g": Machine(208, 1872, gpus=8, fabric=8),  # GPUDirect-TCPXO
}
# Each GCP A3 type's plugin: GCP's image repository and where its installer puts the plugin on the host.
GCP_PLUGIN = {
    "a3-highgpu-8g": ("gpudirect-tcpx", "/var/lib/tcpx/lib64"),
    "a3-megagpu-8g": ("gpudirect-tcpxo", "/var/lib/tcpxo/lib64"),
}
# A pod gets at most this share of its machine's cpu and memory: the rest is the kubelet's, the system's and
# the DaemonSets' (device plugins, CNI, logging).
POD_SHARE = 0.9
PINNED_IMAGE = re.compile(r"\S+:v\d+(\.\d+)+")


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def gpu_node_types(config: dict) -> dict[str, dict]:
    nodes = config["available_node_types"]
    return {name: node for name, node in nodes.items() if name != config["head_node_type"]}


def efa_layout_problems(node_config: dict) -> list[str]:
    """What is wrong with an EC2 GPU node's EFA interfaces for its instance type (empty: nothing)."""
    machine = EC2[node_config["InstanceType"]]
    interfaces = node_config.get("NetworkInterfaces", [])
    problems = []
    if len(interfaces) != machine.fabric:
        problems.append(f"{len(interfaces)} interfaces for {machine.fabric} EFA network cards")
    if sorted(i.get("NetworkCardIndex") for i in interfaces) != list(range(len(interfaces))):
        problems.append("not one interface per network card 0..n-1")
    for interface in interfaces:
        card = interface.get("NetworkCardIndex")
        # AWS: the primary interface (card 0) is device 0 and an EFA with ENA; the others device 1
        if interface.get("DeviceIndex") != (0 if card == 0 else 1):
            problems.append(f"card {card}: device index {interface.get('DeviceIndex')}")
        if interface.get("InterfaceType") not in ({"efa"} if card == 0 else {"efa", "efa-only"}):
            problems.append(f"card {card}: {interface.get('InterfaceType')}")
    if len({interface.get("SubnetId") for interface in interfaces}) > 1:
        problems.append("interfaces in more than one subnet")
    if not node_config.get("Placement", {}).get("GroupName"):
        problems.append("no placement group")
    return problems


def test_aws_gpu_workers_have_one_efa_per_network_card_in_one_placement_group_and_subnet():
    config = launcher("aws.yaml")
    nodes = gpu_node_types(config)
    assert {node["node_config"]["InstanceType"] for node in nodes.values()} == {"p5.48xlarge", "p4d.24xlarge"}
    for node in nodes.values():
        node_config = node["node_config"]
        assert efa_layout_problems(node_config) == []
        # what Ray's AWS provider does with the interfaces before launching: it accepts them
        assert set(_configure_subnets_and_groups_from_network_interfaces(node_config)["SubnetIds"]) == {
            node_config["NetworkInterfaces"][0]["SubnetId"]
        }
        # the EFA devices reach the container, which may pin memory, and libfabric takes the EFA provider
        options = node["docker"]["worker_run_options"]
        assert {"--device=/dev/infiniband", "--cap-add=IPC_LOCK", "--env FI_PROVIDER=efa"} <= set(options)
    # every GPU node in one placement group and one subnet, in one zone
    assert len({node["node_config"]["Placement"]["GroupName"] for node in nodes.values()}) == 1
    interfaces = [i for node in nodes.values() for i in node["node_config"]["NetworkInterfaces"]]
    assert len({interface["SubnetId"] for interface in interfaces}) == 1
    assert "," not in config["provider"]["availability_zone"]
    assert "--ulimit memlock=-1" in config["docker"]["run_options"]


def test_a_missing_or_misplaced_efa_interface_is_caught():
    node_config = gpu_node_types(launcher("aws.yaml"))["gpu-p5-spot"]["node_config"]
    fewer = copy.deepcopy(node_config)
    del fewer["NetworkInterfaces"][5]  # card 5 left out
    assert efa_layout_problems(fewer) == [
        "31 interfaces for 32 EFA network cards",
        "not one interface per network card 0..n-1",
    ]
    plain = copy.deepcopy(node_config)
    plain["NetworkInterfaces"][3]["InterfaceType"] = "interface"
    del plain["Placement"]
    assert efa_layout_problems(plain) == ["card 3: interface", "no placement group"]


def test_gcp_a3_workers_have_a_gpu_nic_per_vpc_and_their_gpudirect_plugin():
    config = launcher("gcp.yaml")
    head_network = config["available_node_types"]["head"]["node_config"]["networkInterfaces"][0]["network"]
    nodes = gpu_node_types(config)
    assert {node["node_config"]["machineType"] for node in nodes.values()} == set(GCE)
    for node in nodes.values():
        machine_type = node["node_config"]["machineType"]
        machine = GCE[machine_type]
        # Ray's GCP provider detects no CPUs or GPUs: without them the autoscaler never starts the node
        assert node["resources"] == {"CPU": machine.vcpus, "GPU": machine.gpus}
        interfaces = node["node_config"]["networkInterfaces"]
        assert len(interfaces) == 1 + machine.fabric  # the host NIC and one per GPU NIC
        assert interfaces[0]["network"] == head_network
        assert all(interface["nicType"] == "GVNIC" for interface in interfaces)
        networks = [interface["network"] for interface in interfaces]
        assert len(set(networks)) == len(networks)  # each NIC on its own VPC network, as GCP requires
        # the host side: GCP's receive-datapath manager and plugin installer, both at a fixed version
        repository, plugin_dir = GCP_PLUGIN[machine_type]
        commands = " ".join(node["initialization_commands"])
        images = re.findall(rf"us-docker\.pkg\.dev/gce-ai-infra/{repository}/\S+", commands)
        assert {image.split("/")[-1].split(":")[0] for image in images} == {
            "tcpgpudmarxd-dev",
            "nccl-plugin-gpudirecttcpx-dev",
        }
        assert all(PINNED_IMAGE.fullmatch(image) for image in images)
        assert "receive-datapath-manager" in commands
        assert "install --install-nccl" in commands
        # the container sees the plugin, first on LD_LIBRARY_PATH, ahead of the image's EFA plugin
        options = node["docker"]["worker_run_options"]
        mounts = dict(o.removeprefix("--volume ").split(":") for o in options if o.startswith("--volume "))
        library_path = next(o for o in options if o.startswith("--env LD_LIBRARY_PATH="))
        assert library_path.removeprefix("--env LD_LIBRARY_PATH=").split(":")[0] == mounts[plugin_dir]
    tcpx = dict(
        o.removeprefix("--env ").strip("'").split("=", 1)
        for o in nodes["gpu-a3-high-spot"]["docker"]["worker_run_options"]
        if o.startswith("--env ")
    )
    assert len(tcpx["NCCL_GPUDIRECTTCPX_SOCKET_IFNAME"].split(",")) == GCE["a3-highgpu-8g"].fabric
    assert tcpx["NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX"] == "/run/tcpx"
    # TCPXO's settings come from the profile its installer writes, read before `ray start`
    mega_options = nodes["gpu-a3-mega-spot"]["docker"]["worker_run_options"]
    assert "--env NCCL_LIB_DIR=/var/lib/tcpxo/lib64" in mega_options
    assert any(
        'source "$NCCL_LIB_DIR/nccl-env-profile.sh"' in command and "ray start" in command
        for command in config["worker_start_ray_commands"]
    )


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_node_types_with_their_own_initialization_still_mount_the_shared_volume(path):
    """A node type's initialization_commands replace the global ones: they must mount /mnt/shared again."""
    for node in launcher(path.name)["available_node_types"].values():
        if "initialization_commands" in node:
            assert any("/mnt/shared" in c and "mount -t nfs" in c for c in node["initialization_commands"])


def test_dockerfile_installs_libfabric_and_builds_aws_ofi_nccl_at_pinned_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    pins = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", text, re.MULTILINE))
    for name in ("EFA_INSTALLER", "AWS_OFI_NCCL"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", pins[name])  # a release, not "latest" or a branch
    assert re.search(r"^ARG WITH_EFA=1$", text, re.MULTILINE)  # on by default; 0 leaves the layer out
    layer = next(block for block in text.split("\n\n") if "efa_installer.sh" in block)
    assert 'if [ "${WITH_EFA}" = 1 ]' in layer
    # libfabric: the EFA installer's user space only (the host has the driver and the limits)
    assert "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in layer
    assert "./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in layer
    # aws-ofi-nccl: its release tag, built against this libfabric and this CUDA, installed
    clone = 'git clone --depth 1 --branch "v${AWS_OFI_NCCL_VERSION}" https://github.com/aws/aws-ofi-nccl.git'
    assert clone in layer
    configure = re.search(r"\./configure (.*?)&&", layer, re.DOTALL).group(1).split()
    prefix = next(word.removeprefix("--prefix=") for word in configure if word.startswith("--prefix="))
    assert {
        "--with-libfabric=/opt/amazon/efa",
        "--with-cuda=/usr/local/cuda",
        "--enable-platform-aws",
    } <= set(configure)
    assert "make install" in layer
    # NCCL finds the plugin (libnccl-net.so) on LD_LIBRARY_PATH, first
    library_path = re.search(r"^ENV LD_LIBRARY_PATH=(\S+)", text, re.MULTILINE).group(1).split(":")
    assert library_path[:2] == [f"{prefix}/lib", "/opt/amazon/efa/lib"]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity in cores or bytes: "172", "500m", "1800Gi", "5120Mi"."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * units[suffix]
    return float(text)


def kuberay_pods(manifest: dict) -> list[dict]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def fit_problems(pod: dict) -> list[str]:
    """Why a pod does not fit the machine its nodeSelector names (empty: it fits)."""
    instance_type = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
    if instance_type not in EC2:
        return [f"names no known machine ({instance_type})"]
    machine = EC2[instance_type]
    resources = pod["containers"][0]["resources"]
    problems = [] if resources["requests"] == resources["limits"] else ["requests differ from limits"]
    limits = resources["limits"]
    if quantity(limits["cpu"]) > POD_SHARE * machine.vcpus:
        problems.append(f"cpu {limits['cpu']} over {POD_SHARE:.0%} of {machine.vcpus}")
    if quantity(limits["memory"]) > POD_SHARE * machine.memory_gib * 2**30:
        problems.append(f"memory {limits['memory']} over {POD_SHARE:.0%} of {machine.memory_gib}Gi")
    if int(limits.get("nvidia.com/gpu", 0)) > machine.gpus:
        problems.append(f"{limits['nvidia.com/gpu']} GPUs on a {machine.gpus}-GPU machine")
    if int(limits.get("vpc.amazonaws.com/efa", 0)) > machine.fabric:
        problems.append(f"{limits['vpc.amazonaws.com/efa']} EFA devices on a machine with {machine.fabric}")
    # a memory-backed /dev/shm counts against the pod's memory limit
    shm = next(v for v in pod["volumes"] if v["name"] == _mounts(pod)["/dev/shm"])  # noqa: S108
    if quantity(shm["emptyDir"].get("sizeLimit", "inf")) > quantity(limits["memory"]):
        problems.append(f"shm of {shm['emptyDir'].get('sizeLimit', 'no limit')} over the memory limit")
    return problems


def _mounts(pod: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_fit_the_machine_they_name(name):
    pods = kuberay_pods(kuberay(name))
    for pod in pods:
        assert fit_problems(pod) == []
    # caught: a pod asking for the whole machine, or naming none (as the 900Gi worker did)
    worker = copy.deepcopy(pods[1])
    resources = worker["containers"][0]["resources"]
    resources["limits"] = {**resources["limits"], "memory": "2048Gi"}
    assert fit_problems(worker) == ["requests differ from limits", "memory 2048Gi over 90% of 2048Gi"]
    del worker["nodeSelector"]
    assert fit_problems(worker) == ["names no known machine (None)"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_gpu_workers_use_every_efa_device_and_a_memory_backed_shm(name):
    for pod in kuberay_pods(kuberay(name))[1:]:
        container = pod["containers"][0]
        machine = EC2[pod["nodeSelector"]["node.kubernetes.io/instance-type"]]
        assert int(container["resources"]["limits"]["vpc.amazonaws.com/efa"]) == machine.fabric
        assert "hugepages-2Mi" in container["resources"]["limits"]  # the EFA driver's (AWS's example)
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
        assert {"name": "FI_PROVIDER", "value": "efa"} in container["env"]
        shm = next(v for v in pod["volumes"] if v["name"] == _mounts(pod)["/dev/shm"])  # noqa: S108
        assert shm["emptyDir"]["medium"] == "Memory"
        assert quantity(shm["emptyDir"]["sizeLimit"]) > 0


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
