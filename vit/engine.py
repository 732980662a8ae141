"""The DeepSpeed side of pretraining: config, initialise, one micro-batch, save/load (a save staged into
host memory first, to be written while training goes on), universal conversion, consolidated weights.

No Ray here: whoever starts the processes (Ray Train in vitpipe, a test's one-rank gloo group) sets up
torch.distributed first, then calls `build_engine` in every rank. The same code runs on GPUs (NCCL) and
on CPUs (gloo, DeepSpeed's CPU accelerator, chosen by DS_ACCELERATOR=cpu in the worker's environment).
DeepSpeed itself is imported on first use (`noqa: PLC0415` below): the pretraining driver imports this
module (through the export), and importing DeepSpeed (2.5 s) starts its accelerator detection (and its
log line) in every process that imports this one, the driver included.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vit.objective import StepLoss, make_optimizer, set_lr, training_loss
from vit.recipe import Recipe, Zero

LATEST_UNIVERSAL = "latest_universal"


def deepspeed_config(
    recipe: Recipe, zero: Zero, world_size: int, *, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config for `recipe` on `world_size` ranks, with the user's extra raw keys merged in."""
    if recipe.batch.world != world_size:
        raise ValueError(f"the recipe's batch is split for {recipe.batch.world} rank(s), not {world_size}")
    config: dict[str, Any] = {
        "train_batch_size": recipe.batch.global_batch,
        "train_micro_batch_size_per_gpu": recipe.batch.micro_batch,
        "gradient_accumulation_steps": recipe.batch.accumulation,
        "gradient_clipping": recipe.optimizer.grad_clip or 0.0,
        **precision_config(recipe.bf16, zero),
        "zero_optimization": zero_section(zero),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # vitpipe prints its own progress
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every micro-batch's start and step
        # (on by default); vitpipe times steps itself, reading the device only at log steps.
        "timers": {"throughput": {"enabled": False}},
    }
    if zero.offload_optimizer:
        # The torch optimizer on CPU (DeepSpeedCPUAdam needs compiled ops, which are not built here).
        config["zero_force_ds_cpu_optimizer"] = False
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return _merge(config, zero.extra)


def precision_config(bf16: bool, zero: Zero) -> dict[str, Any]:
    """bf16 compute with fp32 master weights, gradients reduced and accumulated in `zero.grad_reduce_dtype`.

    ZeRO >= 1 keeps bf16 weights and fp32 master partitions in its optimizer; fp32 reduction and
    accumulation are its `communication_data_type` and `data_types.grad_accum_dtype`. ZeRO-0's bf16 mode
    trains bf16 weights with no fp32 copy that a checkpoint keeps, and refuses fp32 accumulation: there
    the weights stay fp32 and the forward runs under bf16 autocast (DeepSpeed's `torch_autocast`), so the
    fp32 weights are the master weights and the checkpoint holds them."""
    if not bf16:
        return {"bf16": {"enabled": False}}
    reduce_dtype = zero.grad_reduce_dtype
    if zero.stage == 0:
        autocast = {"enabled": True, "dtype": "bfloat16"}
        return {"torch_autocast": autocast, "communication_data_type": reduce_dtype}
    section: dict[str, Any] = {"bf16": {"enabled": True}, "communication_data_type": reduce_dtype}
    if reduce_dtype == "fp32":
        section["data_types"] = {"grad_accum_dtype": "fp32"}
    return section


def zero_section(zero: Zero) -> dict[str, Any]:
    """DeepSpeed's `zero_optimization`: the stage, communication overlapped with backward in buckets
    (stages 1-2 all-gather updated weights in `allgather_bucket_size` buckets; stage 3 prefetches in
    them), and the optimizer's offload."""
    section: dict[str, Any] = {"stage": zero.stage}
    if zero.stage > 0:
        section |= {
            "overlap_comm": zero.overlap_comm,
            "reduce_bucket_size": zero.reduce_bucket_size,
            "contiguous_gradients": True,
        }
        if zero.allgather_bucket_size is not None:
            bucket = "stage3_prefetch_bucket_size" if zero.stage == 3 else "allgather_bucket_size"
            section[bucket] = zero.allgather_bucket_size
    if zero.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return section


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_engine(
    model: nn.Module,
    recipe: Recipe,
    zero: Zero,
    world_size: int,
    *,
    load_universal: bool = False,
    compile_model: bool = False,
) -> Any:
    """`deepspeed.initialize` on an already set-up process group, the model compiled in place when asked
    (`engine.compile`: the module keeps its parameter names, so checkpoints do not change). The learning
    rate is not a DeepSpeed scheduler's state: the loop sets `recipe.lr_at(step)` before each optimizer
    step (`set_step_lr`)."""
    import deepspeed  # noqa: PLC0415

    optimizer = make_optimizer(model, recipe.optimizer)
    config = deepspeed_config(recipe, zero, world_size, load_universal=load_universal)
    with quiet_deepspeed():
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        if compile_model:
            engine.compile()
    return engine


def set_step_lr(engine: Any, recipe: Recipe, step: int) -> float:
    """Give optimizer step `step` its scheduled rate; returns it."""
    lr = recipe.lr_at(step)
    set_lr(engine.optimizer, lr)
    return lr


@contextlib.contextmanager
def quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed logs its whole config at INFO on every rank; keep warnings, drop the rest."""
    from deepspeed.utils import logger as deepspeed_logger  # noqa: PLC0415

    level = deepspeed_logger.level
    deepspeed_logger.setLevel("WARNING")
    try:
        yield
    finally:
        deepspeed_logger.setLevel(level)


def train_micro_batch(
    engine: Any, patches: torch.Tensor, labels: torch.Tensor, recipe: Recipe, rng: np.random.Generator
) -> StepLoss:
    """The recipe's step on one micro-batch through the engine: forward, backward, and (at an
    accumulation boundary) the optimizer step DeepSpeed takes with clipping."""
    result = training_loss(engine.module, patches, labels, recipe, rng, forward=engine)
    engine.backward(result.loss)
    engine.step()
    return result


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(engine: Any, directory: str | Path, tag: str, client_state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shard of model and optimizer under `directory/tag`."""
    write_staged(stage_checkpoint(engine, directory, tag, client_state))


@dataclass(frozen=True)
class StagedFile:
    """A file of a DeepSpeed checkpoint that is not written yet: where it goes, and host copies of its
    state (training may change the engine's tensors meanwhile; these stay as they were)."""

    path: Path
    state: Any
    zipfile_serialization: bool  # torch.save's format, as DeepSpeed's config asks


def stage_checkpoint(
    engine: Any, directory: str | Path, tag: str, client_state: dict[str, Any]
) -> list[StagedFile]:
    """Every rank's DeepSpeed checkpoint under `directory/tag`, held in host memory instead of written:
    what `engine.save_checkpoint` would write, copied off the device while training waits. The small
    files DeepSpeed writes itself (`latest`, the zero_to_fp32 scripts) are written at once; `write_staged`
    writes the rest, from any thread, while training goes on."""
    staging = _staging_engine_type()(engine._config)
    writer, engine.checkpoint_engine = engine.checkpoint_engine, staging
    try:
        with quiet_deepspeed():
            engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    finally:
        engine.checkpoint_engine = writer
    return staging.staged


def write_staged(files: list[StagedFile]) -> None:
    """Write staged checkpoint files as DeepSpeed's TorchCheckpointEngine would have."""
    for file in files:
        file.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(file.state, file.path, _use_new_zipfile_serialization=file.zipfile_serialization)


@functools.cache
def _staging_engine_type() -> type:
    """DeepSpeed's TorchCheckpointEngine that keeps each file's state as host copies rather than writing
    it (a class made on first use: DeepSpeed is imported late, see the module's docstring). Loading is
    the parent's."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (  # noqa: PLC0415
        TorchCheckpointEngine,
    )

    class StagingCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, config_params: Any = None) -> None:
            super().__init__(config_params)
            self.staged: list[StagedFile] = []

        def preserves_storage_sharing(self) -> bool:
            # DeepSpeed clones views before saving when this is true; every tensor is copied here anyway.
            return False

        def save(self, state_dict: Any, path: str) -> None:
            devices: set[torch.device] = set()
            state = _host_copies(state_dict, devices)
            wait_for_host_copies(devices)
            self.staged.append(StagedFile(Path(path), state, bool(self.zipfile_serialization)))

    return StagingCheckpointEngine


def _host_copies(value: Any, devices: set[torch.device]) -> Any:
    """`value` with every tensor in it replaced by its host copy, and its containers rebuilt (a state
    dict's lists and dicts, such as the optimizer's param_groups, change as training goes on); other
    objects are kept as they are. The devices copied from are added to `devices`."""
    if torch.is_tensor(value):
        devices.add(value.device)
        return to_host(value)
    if isinstance(value, dict):
        copied = copy.copy(value)  # keeps the mapping's type (OrderedDict, defaultdict's factory)
        for key, item in value.items():
            copied[key] = _host_copies(item, devices)
        return copied
    if isinstance(value, list):
        return [_host_copies(item, devices) for item in value]
    if isinstance(value, tuple):
        items = [_host_copies(item, devices) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of `tensor` in storage of its own (a view does not drag its whole flat buffer along):
    a clone on the CPU; from a GPU, an asynchronous copy into pinned memory that the caller waits for
    with `torch.cuda.synchronize()`."""
    tensor = tensor.detach()
    if not copied_asynchronously(tensor.device):
        return tensor.clone(memory_format=torch.contiguous_format)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def copied_asynchronously(device: torch.device) -> bool:
    """Whether `to_host` copies from `device` into pinned memory without waiting (a GPU), so the copy must
    be waited for; from the CPU it is a clone, done when it returns."""
    return device.type == "cuda"


def wait_for_host_copies(devices: Iterable[torch.device]) -> None:
    """Wait until `to_host`'s copies from `devices` have landed: a synchronize of each GPU among them."""
    for device in {device for device in devices if copied_asynchronously(device)}:
        torch.cuda.synchronize(device)


def load_checkpoint(engine: Any, directory: str | Path, tag: str) -> dict[str, Any]:
    """Restore model and optimizer; returns the client state saved with them. Checkpoints of earlier
    vitpipe versions also hold a LambdaLR state: the engine has no scheduler, so it is not read.

    Two repairs of DeepSpeed 0.19's ZeRO-3 load of a universal checkpoint (every resize), found by the
    2 -> 1 -> 2 test: the optimizer's group settings stay the recipe's (every group got the first group's,
    so biases, norms and position embeddings were decayed), and each group counts its own Adam steps (the
    groups shared one step tensor, so the second group's bias correction ran a step ahead per step)."""
    recipe_groups = [
        {key: value for key, value in group.items() if key != "params"}
        for group in engine.optimizer.param_groups
    ]
    with quiet_deepspeed():
        path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{directory}/{tag}: no DeepSpeed checkpoint to load")
    for group, settings in zip(engine.optimizer.param_groups, recipe_groups, strict=True):
        group.update(settings)
    place_optimizer_state(getattr(engine.optimizer, "optimizer", engine.optimizer))
    return client_state or {}


def place_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's optimizer state on the parameter's device, in the dtype its optimizer steps with.

    A universal checkpoint (every resize) loads Adam's `step` as a CPU tensor shared by a group's
    parameters, and a fused or capturable optimizer on CUDA then fails on mixed devices (pytorch#111123).
    `step` becomes a float32 tensor of its own (one shared tensor advanced a second group's bias
    correction a step ahead), on the parameter's device for fused/capturable optimizers and on the CPU
    otherwise (where torch's loops read it without a device sync); moments follow the parameter. The
    state is walked by its keys: ZeRO-3 puts its partitions into the groups only while it steps."""
    on_device = any(group.get("fused") or group.get("capturable") for group in optimizer.param_groups)
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                device = parameter.device if on_device else torch.device("cpu")
                state[key] = value.to(device=device, dtype=torch.float32, copy=True)
            elif value.is_floating_point():
                state[key] = value.to(device=parameter.device, dtype=parameter.dtype)


def to_universal(directory: str | Path, tag: str, out: str | Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, which loads on any number of ranks.

    Runs in this process (one extract and one merge worker), so it needs no launcher.
    """
    from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415

    out = Path(out)
    args = argparse.Namespace(
        input_folder=str(Path(directory) / tag),
        output_folder=str(out / tag),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # vitpipe's checkpoints are not Megatron's; the info is not needed
    )
    with contextlib.redirect_stdout(io.StringIO()), _no_progress_bars():
        ds_to_universal.main(args)
    (out / LATEST_UNIVERSAL).write_text(tag)
    return out


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def consolidated_state(directory: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a DeepSpeed checkpoint written by any number of ranks and any
    ZeRO stage, gathered in this process (DeepSpeed's own zero_to_fp32 for stages 1-3).

    DeepSpeed checkpoints are pickles; vitpipe loads them only from a run's own storage.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    folder = Path(directory) / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint")
    if not any(folder.glob("*model_states.pt")):  # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt
        raise FileNotFoundError(f"{folder}: no *model_states.pt file; the checkpoint is incomplete")
    optimizer_files = sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"))
    if optimizer_files and _no_zero_stage(optimizer_files[0]):
        state = _universal_fp32_state(directory, tag)
    elif optimizer_files:
        with contextlib.redirect_stdout(io.StringIO()), quiet_deepspeed():
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    else:  # ZeRO stage 0 without bf16: rank 0's model file holds the full fp32 weights
        saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = saved["module"]
    return {name: tensor.float().contiguous() for name, tensor in state.items()}


def _no_zero_stage(optimizer_file: Path) -> bool:
    """Whether DeepSpeed's BF16_Optimizer wrote this file (ZeRO-1 under bf16 with fp32 accumulation): it
    records no ZeRO stage, which is what zero_to_fp32 refuses such a checkpoint for."""
    saved = torch.load(optimizer_file, map_location="cpu", weights_only=False)
    return "zero_stage" not in saved["optimizer_state_dict"]


def _universal_fp32_state(directory: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO-1 bf16 checkpoint with fp32 accumulation, which DeepSpeed trains
    with its BF16_Optimizer and whose files zero_to_fp32 does not read: from its universal form, which
    holds each parameter's fp32 weights (`zero/NAME/fp32.pt`, some flattened), in the shapes of the bf16
    module saved beside them."""
    saved = torch.load(
        Path(directory) / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    shapes = {name: tensor.shape for name, tensor in saved["module"].items()}
    state = {}
    with tempfile.TemporaryDirectory(prefix="vitpipe-universal-") as scratch:
        parameters = to_universal(directory, tag, scratch) / tag / "zero"
        for weights in sorted(parameters.glob("*/fp32.pt")):
            loaded = torch.load(weights, weights_only=True)  # {"param": tensor, ...}, or the tensor alone
            tensor = loaded["param"] if isinstance(loaded, dict) else loaded
            state[weights.parent.name] = tensor.reshape(shapes[weights.parent.name])
    return state
