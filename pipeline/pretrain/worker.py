"""The function every Ray Train worker runs: DeepSpeed engine, data shard, steps, checkpoints, metrics.

The math is `vit.train`; this module adds what Ray gives: the rank, the dataset shard, the checkpoint to
resume from, and `ray.train.report` to hand checkpoints to the run's storage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.preprocess.patchfile import patches_array
from pipeline.pretrain.checkpoints import META_FILE, checkpoint_dir_name, tag_of
from pipeline.pretrain.metrics import MetricsLog, ProgressLine

DATASET = "train"


class PatchBatch(ArrowBatchCollateFn):
    """Arrow rows -> {"patches": uint8 [B, N, D], "labels": int64 [B]}; Ray moves them to the device."""

    def __init__(self, num_patches: int, patch_dim: int) -> None:
        self.shape = (num_patches, patch_dim)

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        patches = patches_array(batch.column("patches")).reshape(-1, *self.shape)
        labels = batch.column("label").to_numpy()
        # A copy: Arrow's buffers are read-only, and the batch is pinned and sent to the device anyway.
        return {"patches": torch.from_numpy(patches.copy()), "labels": torch.from_numpy(labels.copy())}


def train_loop(settings: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    if not settings["use_gpu"]:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks an accelerator
    import ray
    import ray.train
    import torch.distributed as dist

    from vit.config import ViTConfig
    from vit.flops import gpu_peak_flops, measured_matmul_flops, train_flops
    from vit.model import VisionTransformer
    from vit.train import TrainSpec, build_engine, load_checkpoint, save_checkpoint, to_universal

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec = TrainSpec(
        **{**settings["spec"], "betas": tuple(settings["spec"]["betas"]), "bf16": _use_bf16(settings["bf16"])}
    )
    vit_config = ViTConfig.from_dict(settings["vit"])
    device = ray.train.torch.get_device()
    steps_per_epoch = settings["steps_per_epoch"]
    micro_per_epoch = steps_per_epoch * spec.grad_accum

    torch.manual_seed(settings["seed"])  # identical initial weights on every rank
    model = VisionTransformer(vit_config).to(device)

    with ExitStack() as cleanup:
        scratch = Path(tempfile.mkdtemp(prefix="vitpipe-worker-"))
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        resume = newest_checkpoint(ray.train.get_checkpoint(), settings.get("resume_from"))
        step, resumed_from = 0, None
        if resume is not None:
            folder = Path(cleanup.enter_context(resume.as_directory()))
            meta = json.loads((folder / META_FILE).read_text())
            _check_same_model(meta, vit_config, folder)
            universal = meta["world_size"] != world and meta["zero_stage"] > 0
            if universal:  # written by another number of ranks: DeepSpeed's universal format reshards it
                folder = to_universal(folder, meta["tag"], scratch / "universal")
            engine = build_engine(model, spec, world, load_universal=universal)
            load_checkpoint(engine, folder, meta["tag"])
            # The schedule of this launch wins over the one saved (a run may be extended).
            engine.lr_scheduler.lr_lambdas = [spec.schedule()] * len(engine.lr_scheduler.lr_lambdas)
            step, resumed_from = int(meta["step"]), meta
        else:
            engine = build_engine(model, spec, world)

        nodes: list[str | None] = [None] * world  # where the ranks run, for the record
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        log = cleanup.enter_context(closing(MetricsLog(settings["run_dir"]))) if rank == 0 else None
        if log is not None:
            if resumed_from is None:
                log.event(
                    "started", step=0, workers=world, nodes=len(set(nodes)), total_steps=spec.total_steps,
                    threads=torch.get_num_threads(),
                )  # fmt: skip
            else:
                log.event(
                    "resumed", step=step, workers=world, nodes=len(set(nodes)),
                    from_workers=resumed_from["world_size"],
                    total_steps=spec.total_steps, threads=torch.get_num_threads(),
                )  # fmt: skip
            print(f"pretrain: {'resuming at step ' + str(step) if step else 'starting'} on {world} worker(s)")

        images_per_step = spec.micro_batch_size * spec.grad_accum * world
        flops_per_step = train_flops(vit_config) * images_per_step
        peak = _peak_flops(spec.bf16, gpu_peak_flops, measured_matmul_flops) * world
        progress = ProgressLine(spec.total_steps, step)
        rng = np.random.default_rng([settings["seed"], rank, step])
        shard = ray.train.get_dataset_shard(DATASET)
        collate = PatchBatch(vit_config.num_patches, vit_config.patch_dim)

        while step < spec.total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            skip *= spec.grad_accum  # micro-batches this worker already trained on in this epoch
            batches = iter(
                shard.iter_torch_batches(
                    batch_size=spec.micro_batch_size,
                    drop_last=True,
                    collate_fn=collate,
                    local_shuffle_buffer_size=settings["shuffle_buffer"] or None,
                    local_shuffle_seed=settings["seed"] * 1_000_003 + epoch
                    if settings["shuffle_buffer"]
                    else None,
                    prefetch_batches=2,
                    pin_memory=torch.cuda.is_available(),
                )
            )
            for _ in range(skip):
                next(batches)
            micro = skip
            while micro < micro_per_epoch and step < spec.total_steps:
                started = time.perf_counter()
                lr = float(engine.get_lr()[0])  # the rate this step trains with
                totals = torch.zeros(3, dtype=torch.float64)
                waited = 0.0
                for _ in range(spec.grad_accum):
                    wait_started = time.perf_counter()
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(
                            f"rank {rank}: the data shard ran out after {micro} of {micro_per_epoch} "
                            f"micro-batches in epoch {epoch}; the split is smaller than its manifest says"
                        )
                    waited += time.perf_counter() - wait_started
                    result = _train(engine, batch, spec, rng, device)
                    totals += torch.tensor([result.loss * result.images, result.correct, result.images])
                    micro += 1
                step += 1
                dist.all_reduce(totals)
                seconds = time.perf_counter() - started
                if step % settings["log_every"] == 0 or step == spec.total_steps or step == 1:
                    record = _record(step, epoch, totals, engine, lr, seconds, waited, images_per_step,
                                     flops_per_step, peak, vit_config.seq_len)  # fmt: skip
                    if log is not None:
                        log.write(record)
                        print(progress.line(record), flush=True)
                if step % settings["checkpoint_every"] == 0 or step == spec.total_steps:
                    _checkpoint(engine, step, epoch, world, spec, settings, scratch, log, save_checkpoint)
        if log is not None:
            log.event("finished", step=step)


def newest_checkpoint(from_ray: Any, launch_point: str | None) -> Any:
    """Ray Train's checkpoint (a worker-group restart inside this launch) or the run folder's newest
    finished one at launch (a relaunch), whichever is further along; None on a fresh run."""
    from ray.train import Checkpoint

    if launch_point is None:
        return from_ray
    if from_ray is None or _step_of(from_ray.path) < _step_of(launch_point):
        return Checkpoint(launch_point)
    return from_ray


def _step_of(path: str) -> int:
    return int(path.rstrip("/").rsplit("_", 1)[-1])


def _train(
    engine: Any, batch: dict[str, torch.Tensor], spec: Any, rng: np.random.Generator, device: Any
) -> Any:
    from vit.train import train_micro_batch

    patches = batch["patches"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    return train_micro_batch(engine, patches, labels, spec, rng)


def _record(
    step: int, epoch: int, totals: torch.Tensor, engine: Any, lr: float, seconds: float, waited: float,
    images_per_step: int, flops_per_step: float, peak: float, seq_len: int,
) -> dict[str, Any]:  # fmt: skip
    loss_sum, correct, images = totals.tolist()
    grad_norm = engine.get_global_grad_norm()
    images_per_s = images_per_step / seconds
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss_sum / images,
        "accuracy": correct / images,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * seq_len,
        "mfu": flops_per_step / seconds / peak if peak else None,
        "step_s": seconds,
        "data_wait_s": waited,
    }


def _use_bf16(setting: str | bool) -> bool:
    """`bf16: auto` is bf16 on a GPU that supports it (Ampere and newer), fp32 on CPUs and older GPUs."""
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


def _peak_flops(bf16: bool, gpu_peak: Any, measured: Any) -> float | None:
    if torch.cuda.is_available():
        return gpu_peak(torch.cuda.get_device_name(), bf16)
    return measured(torch.bfloat16 if bf16 else torch.float32)


def _checkpoint(
    engine: Any, step: int, epoch: int, world: int, spec: Any, settings: dict[str, Any], scratch: Path,
    log: MetricsLog | None, save: Any,
) -> None:  # fmt: skip
    """Every rank writes its shards to a local folder; `ray.train.report` uploads them all into one
    `checkpoint_NNNNNNNN` folder of the run's storage and keeps the newest `keep_checkpoints`."""
    import ray.train

    folder = scratch / checkpoint_dir_name(step)
    tag = tag_of(step)
    save(engine, folder, tag, client_state={"step": step})
    if log is not None:
        meta = {
            "step": step,
            "epoch": epoch,
            "tag": tag,
            "world_size": world,
            "zero_stage": spec.zero_stage,
            "bf16": spec.bf16,
            "vit": settings["vit"],
            "classes": settings["classes"],
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        log.event("checkpoint", step=step)
        log.sync()
    ray.train.report(
        {"step": step},
        checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
        checkpoint_dir_name=checkpoint_dir_name(step),
    )
    shutil.rmtree(folder, ignore_errors=True)


def _check_same_model(meta: dict[str, Any], vit_config: Any, folder: Path) -> None:
    if meta["vit"] != vit_config.to_dict():
        changed = sorted(k for k in meta["vit"] if meta["vit"][k] != vit_config.to_dict().get(k))
        raise ValueError(f"{folder}: the checkpoint holds another model (differs in {changed})")
