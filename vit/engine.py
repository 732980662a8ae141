"""The DeepSpeed side of pretraining: config, initialise, one micro-batch, save/load, universal
conversion, consolidated weights.

No Ray here: whoever starts the processes (Ray Train in vitpipe, a test's one-rank gloo group) sets up
torch.distributed first, then calls `build_engine` in every rank. The same code runs on GPUs (NCCL) and
on CPUs (gloo, DeepSpeed's CPU accelerator, chosen by DS_ACCELERATOR=cpu in the worker's environment).
DeepSpeed itself is imported on first use: the config schema declares `Zero` from here, and importing
DeepSpeed starts its accelerator detection (and its log line) in every command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vit.recipe import Recipe, Zero
from vit.step import StepLoss, make_optimizer, set_lr, training_loss

LATEST_UNIVERSAL = "latest_universal"


def deepspeed_config(
    recipe: Recipe, zero: Zero, world_size: int, *, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config for `recipe` on `world_size` ranks, with the user's extra raw keys merged in."""
    zero_section: dict[str, Any] = {"stage": zero.stage}
    config: dict[str, Any] = {
        "train_batch_size": recipe.micro_batch_size * recipe.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.grad_accum,
        "gradient_clipping": recipe.optimizer.grad_clip or 0.0,
        "bf16": {"enabled": recipe.bf16},
        "zero_optimization": zero_section,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # vitpipe prints its own progress
        "wall_clock_breakdown": False,
    }
    if zero.offload_optimizer:
        zero_section["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # The torch optimizer on CPU (DeepSpeedCPUAdam needs compiled ops, which are not built here).
        config["zero_force_ds_cpu_optimizer"] = False
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return _merge(config, zero.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_engine(
    model: nn.Module, recipe: Recipe, zero: Zero, world_size: int, *, load_universal: bool = False
) -> Any:
    """`deepspeed.initialize` on an already set-up process group. The learning rate is not a DeepSpeed
    scheduler's state: the loop sets `recipe.lr_at(step)` before each optimizer step (`set_step_lr`)."""
    import deepspeed

    fused = torch.cuda.is_available() and not zero.offload_optimizer
    optimizer = make_optimizer(model, recipe.optimizer, fused=fused)
    config = deepspeed_config(recipe, zero, world_size, load_universal=load_universal)
    with quiet_deepspeed():
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
    return engine


def set_step_lr(engine: Any, recipe: Recipe, step: int) -> float:
    """Give optimizer step `step` its scheduled rate; returns it."""
    lr = recipe.lr_at(step)
    set_lr(engine.optimizer, lr)
    return lr


@contextlib.contextmanager
def quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed logs its whole config at INFO on every rank; keep warnings, drop the rest."""
    from deepspeed.utils import logger as deepspeed_logger

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
    with quiet_deepspeed():
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)


def load_checkpoint(engine: Any, directory: str | Path, tag: str) -> dict[str, Any]:
    """Restore model and optimizer; returns the client state saved with them. Checkpoints of earlier
    vitpipe versions also hold a LambdaLR state: the engine has no scheduler, so it is not read.

    Two repairs of DeepSpeed 0.19's ZeRO-3 load of a universal checkpoint (every resize), found by the
    2 -> 1 -> 2 test: the optimizer's group settings stay the recipe's (every group got the first group's,
    so biases, norms and position embeddings were decayed), and each group counts its own Adam steps (the
    groups shared one step tensor, so the second group's bias correction ran a step ahead per step)."""
    recipe_groups = [{key: value for key, value in group.items() if key != "params"}
                     for group in engine.optimizer.param_groups]  # fmt: skip
    with quiet_deepspeed():
        path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{directory}/{tag}: no DeepSpeed checkpoint to load")
    for group, settings in zip(engine.optimizer.param_groups, recipe_groups, strict=True):
        group.update(settings)
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in torch_optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return client_state or {}


def to_universal(directory: str | Path, tag: str, out: str | Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, which loads on any number of ranks.

    Runs in this process (one extract and one merge worker), so it needs no launcher.
    """
    from deepspeed.checkpoint import ds_to_universal

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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(directory) / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint")
    if not any(folder.glob("*model_states.pt")):  # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt
        raise FileNotFoundError(f"{folder}: no *model_states.pt file; the checkpoint is incomplete")
    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        with contextlib.redirect_stdout(io.StringIO()), quiet_deepspeed():
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    else:  # ZeRO stage 0 without bf16: rank 0's model file holds the full fp32 weights
        saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = saved["module"]
    return {name: tensor.float().contiguous() for name, tensor in state.items()}
