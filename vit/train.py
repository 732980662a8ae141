"""The per-worker training loop's parts on DeepSpeed: engine, step, checkpoints, consolidated weights.

No Ray here: whoever starts the processes (Ray Train in vitpipe) sets up torch.distributed first, then
calls `build_engine` in every rank. The same code runs on GPUs (NCCL) and on CPUs (gloo, DeepSpeed's
CPU accelerator), which is how the tests run it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vit.augment import mixup, random_hflip, soft_targets
from vit.optim import WarmupDecay, param_groups

# Keys vitpipe derives itself; setting them as raw DeepSpeed keys would contradict the validated config.
DERIVED_DEEPSPEED_KEYS = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "optimizer",
        "scheduler",
        "bf16",
        "fp16",
    }
)
LATEST_UNIVERSAL = "latest_universal"


@dataclass(frozen=True)
class TrainSpec:
    """What one worker's loop needs besides model and data, as plain values (no config classes)."""

    total_steps: int
    micro_batch_size: int
    grad_accum: int = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    bf16: bool = False
    flip: bool = True
    mixup_alpha: float = 0.0
    extra_deepspeed: dict[str, Any] = field(default_factory=dict)

    def schedule(self) -> WarmupDecay:
        return WarmupDecay(self.total_steps, self.warmup_steps, self.decay, self.min_lr_ratio)


def refuse_derived_keys(extra: dict[str, Any]) -> None:
    """Raw DeepSpeed keys may add to the generated config, not contradict what vitpipe derives."""
    clash = sorted(DERIVED_DEEPSPEED_KEYS & set(extra))
    if clash:
        raise ValueError(f"deepspeed: {clash} are derived from vitpipe's own keys; set those instead")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets (label smoothing, mixup), in fp32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def deepspeed_config(spec: TrainSpec, world_size: int, *, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for `spec` on `world_size` ranks, with the user's extra raw keys merged in."""
    refuse_derived_keys(spec.extra_deepspeed)
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    config: dict[str, Any] = {
        "train_batch_size": spec.micro_batch_size * spec.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip or 0.0,
        "bf16": {"enabled": spec.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # vitpipe prints its own progress
        "wall_clock_breakdown": False,
    }
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # The torch optimizer on CPU (DeepSpeedCPUAdam needs compiled ops, which are not built here).
        config["zero_force_ds_cpu_optimizer"] = False
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return _merge(config, spec.extra_deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW or SGD-momentum over the decay/no-decay groups; fused kernels on CUDA."""
    groups = param_groups(model, spec.weight_decay)
    fused = {"fused": True} if torch.cuda.is_available() and not spec.offload_optimizer else {}
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, **fused)
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, **fused)


def build_engine(model: nn.Module, spec: TrainSpec, world_size: int, *, load_universal: bool = False) -> Any:
    """`deepspeed.initialize` on an already set-up process group, with the LR schedule attached so that
    DeepSpeed steps it at each optimizer step and saves it with each checkpoint."""
    import deepspeed

    optimizer = make_optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, spec.schedule())
    config = deepspeed_config(spec, world_size, load_universal=load_universal)
    with _quiet_deepspeed():
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
    return engine


@contextlib.contextmanager
def _quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed logs its whole config at INFO on every rank; keep warnings, drop the rest."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel("WARNING")
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class MicroBatchResult:
    loss: float
    correct: int
    images: int


def train_micro_batch(
    engine: Any, patches: torch.Tensor, labels: torch.Tensor, spec: TrainSpec, rng: np.random.Generator
) -> MicroBatchResult:
    """Forward, backward and (at an accumulation boundary) optimizer step on one micro-batch of uint8
    patches: flip and mixup on the device, normalisation on the device, soft-target cross-entropy."""
    model = engine.module
    config = model.config
    if spec.flip:
        patches = random_hflip(patches, config.patch_size, config.channels)
    images = model.normalize(patches)
    targets = soft_targets(labels, config.num_classes, spec.label_smoothing)
    if spec.mixup_alpha > 0:
        images, targets = mixup(images, targets, float(rng.beta(spec.mixup_alpha, spec.mixup_alpha)))
    logits = engine(images, normalized=True)
    loss = soft_cross_entropy(logits, targets)
    engine.backward(loss)
    engine.step()
    correct = int((logits.detach().argmax(-1) == labels).sum())
    return MicroBatchResult(float(loss.detach()), correct, labels.shape[0])


def save_checkpoint(engine: Any, directory: str | Path, tag: str, client_state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shard of model, optimizer and schedule under `directory/tag`."""
    with _quiet_deepspeed():
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)


def load_checkpoint(engine: Any, directory: str | Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer and schedule; returns the client state saved with them."""
    with _quiet_deepspeed():
        path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{directory}/{tag}: no DeepSpeed checkpoint to load")
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
    with contextlib.redirect_stdout(io.StringIO()), _quiet_progress():
        ds_to_universal.main(args)
    (out / LATEST_UNIVERSAL).write_text(tag)
    return out


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
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
        with contextlib.redirect_stdout(io.StringIO()), _quiet_deepspeed():
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    else:  # ZeRO stage 0 without bf16: rank 0's model file holds the full fp32 weights
        saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = saved["module"]
    return {name: tensor.float().contiguous() for name, tensor in state.items()}
