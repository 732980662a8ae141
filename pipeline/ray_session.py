"""The one way vitpipe gets Ray: join the cluster the user names, else start a local one."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ray  # noqa: TID253 (getting Ray is this module's work; torch stays lazy)

from pipeline.console import say

if TYPE_CHECKING:
    import torch

ADDRESS_ENV = "RAY_ADDRESS"


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Connect to `address` (or $RAY_ADDRESS) if given, else start a local Ray sized to this machine.

    Returns a one-line description of what Ray is running on. Calling it again is a no-op, so
    library code can call it freely and a test session can start Ray once for every test.
    """
    if ray.is_initialized():
        return _describe()
    address = address or os.environ.get(ADDRESS_ENV) or None
    options: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        # "local" always starts a new instance; None would join any cluster this machine runs. The
        # dashboard serves the State API that Ray Train's placement-group cleaner polls every second:
        # without it each poll fails, floods the log with warnings and slowed a 40-step run 2.5x here.
        address = "local"
        options |= {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": True}
    try:
        check_reachable(address)
    except ConnectionError as error:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r}: {error}. Check the address and that the head "
            "node is up"
        ) from error
    try:
        ray.init(address=address, **options)
        interrupt_on_sigterm()
    except ConnectionError as error:  # Ray's own message names the head's internal address: left out
        raise ConnectionError(
            f"the Ray cluster at {address!r} answers but did not let this process join: {_auth_hint()}"
        ) from error
    return _describe()


def interrupt_on_sigterm() -> None:
    """SIGTERM stops this driver as Ctrl-C does (KeyboardInterrupt: a run is recorded "interrupted", its
    tracking KILLED, with a word on the console), in place of the handler ray.init installs, which exits
    at once (a run then stayed "failed" and silent). Pretraining's clean stop installs its own over it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def _auth_hint() -> str:
    """What to check when a cluster that answers refuses to be joined: most often its token."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return (
            "if it uses token authentication (cluster/ starts it so), set RAY_AUTH_MODE=token here and "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token) to its token; else check its Ray version is this one's"
        )
    return "check that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds the cluster's token"


def connect_ray(address: str | None = None) -> None:
    """`init_ray`, saying once, when it starts or joins Ray, what Ray runs on."""
    if not ray.is_initialized():
        say(init_ray(address), err=True)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a HOST:PORT (or ray://HOST:PORT) address has nobody listening.

    Ray itself retries an unreachable GCS for well over a minute before giving up.
    """
    if address.startswith(("http://", "https://")):
        raise ConnectionError(
            f"{address} is a dashboard's address (the Jobs API of submit, jobs and status); this command "
            "joins the cluster itself: HEAD:6379, or ray://HEAD:10001 from outside it"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {host}:{port} ({error.strerror or error})") from None


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of Ray Train's worker processes, set before they start (and so before they import
    DeepSpeed, which picks its accelerator then)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    # Ray Train's print patch sends each print to its logger and, where stdout is redirected as in Ray
    # workers, to stdout as well: every progress line reached the driver twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def task_device(
    gpu_ids: Sequence[int | str], cuda_available: bool, *, ray_sets_visible_devices: bool = True
) -> torch.device:
    """The device a Ray task computes on: the GPU Ray assigned it (`gpu_ids`, from `ray.get_gpu_ids()`),
    else the CPU. Ray 2.60 no longer hides the GPUs from a task that asked for none (CUDA_VISIBLE_DEVICES
    is left as it is), so `torch.cuda.is_available()` alone would put such a task on a GPU that Ray
    scheduled for another. With a GPU assigned, CUDA_VISIBLE_DEVICES holds it alone: it is "cuda" (device
    0); unless Ray was told not to set it (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), then it is the
    assigned GPU's own index."""
    import torch

    if not gpu_ids:
        return torch.device("cpu")
    if not cuda_available:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        raise RuntimeError(
            f"Ray assigned this task GPU {', '.join(map(str, gpu_ids))} but torch cannot use CUDA here "
            f"(torch {torch.__version__}, {build}): the node's driver or this torch build cannot see the "
            "GPU. Install a CUDA build of torch that the node's driver supports, or set gpus_per_task: 0"
        )
    return torch.device("cuda") if ray_sets_visible_devices else torch.device("cuda", int(gpu_ids[0]))


def ray_task_device() -> torch.device:
    """`task_device` of the Ray task this runs in."""
    import torch

    noset = os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "") not in ("", "0")
    return task_device(ray.get_gpu_ids(), torch.cuda.is_available(), ray_sets_visible_devices=not noset)


def check_resources(needs: dict[str, float], what: str, remedy: str, *, per_node: bool = False) -> None:
    """Work the cluster cannot place would wait forever: refuse it with the numbers instead. `needs` is
    summed over the cluster, or, with `per_node`, what one task needs of a single node."""
    if per_node:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        have = {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in needs}
        where = "the largest node has"
    else:
        have = {key: ray.cluster_resources().get(key, 0.0) for key in needs}
        where = "the cluster has"
    short = [
        f"{need:g} {key} needed, {where} {have[key]:g}" for key, need in needs.items() if have[key] < need
    ]
    if short:
        raise ValueError(f"{what} cannot be placed ({'; '.join(short)}); {remedy}")


def cluster_cpus() -> int:
    """CPUs the connected cluster has in total (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _describe() -> str:
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    gpus = int(resources.get("GPU", 0))
    return f"Ray {ray.__version__}: {nodes} node(s), {int(resources.get('CPU', 0))} CPU, {gpus} GPU"


def task_error(error: ray.exceptions.RayError) -> str:
    """What a failed Ray task raised, as one line (`ValueError: ...`), or Ray's own message (a lost
    worker, a cancelled task) when the task itself raised nothing."""
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(error).strip()
