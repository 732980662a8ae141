"""`vitpipe info`: what this environment runs: versions, accelerator, and the Ray cluster if reachable."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "ray", "deepspeed", "webdataset", "pyarrow", "numpy", "pillow", "pydantic")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's version and the installed versions of `names`, by default the packages vitpipe runs on
    ('missing' when not installed)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def accelerator() -> str:
    """'cuda: N x NAME' when torch sees GPUs, else 'cpu: N cores'."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda: {count} x {torch.cuda.get_device_name(0)}"
    return f"cpu: {os.cpu_count()} cores"


def ray_cluster(address: str | None) -> str:
    """The reachable Ray cluster's nodes and resources; never starts one."""
    import ray

    from pipeline.ray_session import ADDRESS_ENV, init_ray

    target = address or os.environ.get(ADDRESS_ENV) or "auto"
    was_connected = ray.is_initialized()
    try:
        description = init_ray(target)
    except ConnectionError as error:
        if target == "auto":
            return "no Ray cluster running here (pass --address or set RAY_ADDRESS to reach one)"
        return f"unreachable: {error}"
    resources = {k: v for k, v in sorted(ray.cluster_resources().items()) if "node:" not in k}
    if not was_connected:
        ray.shutdown()
    shown = ", ".join(f"{k}={v:g}" for k, v in resources.items())
    return f"{description}\n  resources: {shown}"


def report(address: str | None = None) -> str:
    lines = [f"{name:<11} {version}" for name, version in package_versions().items()]
    lines.append(f"{'platform':<11} {platform.platform()} ({sys.executable})")
    lines.append(f"{'accelerator':<11} {accelerator()}")
    lines.append(f"{'ray cluster':<11} {ray_cluster(address)}")
    return "\n".join(lines)
