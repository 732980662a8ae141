"""The function every Ray Train worker runs: a thin adapter from Ray Train to `vit.loop.pretrain_loop`.

What Ray gives is turned into the loop's hooks here: the rank and device (`ray.train.get_context`), the
rank's rows of the run's order from the checkpoint's position on (`pipeline.pretrain.feed`) as each
epoch's batches, the checkpoint to resume from (the run folder's newest complete one, as rank 0 finds it),
`ray.train.report` to hand every rank's checkpoint shards to the run's storage, and the notices of an
elastic group (`pipeline.pretrain.elastic`). The training itself
is `vit/`. `data_loop` is the same worker with no training (`vitpipe pretrain --data-only`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.collective
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.console import detail, say
from pipeline.console import progress as show_progress
from pipeline.metrics import MetricsLog, ProgressLine
from pipeline.pretrain.checkpoints import (
    META_FILE,
    architecture_of,
    ema_files,
    list_checkpoints,
    tag_of,
)
from pipeline.pretrain.control import StopPoll
from pipeline.pretrain.elastic import Notices
from pipeline.pretrain.feed import Feed
from pipeline.pretrain.order import ORDER_FORMAT, Lineage, extend_lineage
from pipeline.pretrain.plan import WorkerSettings
from pipeline.pretrain.probe_client import ProbeClient, from_rank_zero, probe_cadence
from pipeline.pretrain.saving import Saver
from pipeline.storage import resolve
from vit.build import build_model
from vit.config import architecture_record
from vit.device import enable_tf32, object_group, prefetch_to_device
from vit.ema import Ema
from vit.engine import build_engine, load_checkpoint, to_universal
from vit.flops import peak_flops, train_flops
from vit.fragments import Fragments, assemble, load_fragments, local_fragments, parameter_shapes
from vit.loop import Batch, Hooks, Throughput, pretrain_loop
from vit.objective import use_bf16
from vit.recipe import Recipe
from vit.weights import backbone_digest, state_digest

SETTINGS = "settings"  # the one key of the train_loop_config


def train_loop(config: dict[str, WorkerSettings]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    settings = config[SETTINGS]
    plan = settings.plan
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # The global batch is the run's whatever the group's size: each rank's accumulation follows the size.
    batch = plan.recipe.batch.on(world)
    recipe = dataclasses.replace(plan.recipe, bf16=use_bf16(plan.bf16, device), batch=batch)
    if plan.speed.tf32:
        enable_tf32(device)
    torch.manual_seed(plan.seed)  # identical initial weights on every rank; steps reseed per rank
    model = build_model(plan.architecture, device=device)
    model.set_activation_checkpointing(plan.speed.activation_checkpointing)
    with ExitStack() as cleanup:
        scratch = Path(tempfile.mkdtemp(prefix="vitpipe-worker-"))
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        engine, step, resumed, ema_parts = _engine(model, recipe, settings, world, scratch, cleanup)
        ema = _start_ema(engine, plan.ema_decay, ema_parts, step, rank)
        log = (
            cleanup.enter_context(closing(MetricsLog(settings.run_dir, settings.tracking)))
            if rank == 0
            else None
        )
        _announce(log, step, resumed, world, recipe, engine)
        feed = cleanup.enter_context(closing(_feed(settings, rank, world, step, resumed, device)))
        saver = Saver(rank, scratch, log, asynchronous=plan.checkpoint_async)
        cleanup.callback(saver.wait)  # a save in flight ends before its scratch folder goes, on errors too
        objects = object_group(dist.get_backend())
        cadence = probe_cadence(plan, batch)
        probes = ProbeClient(settings.prober, cadence, parameter_shapes(engine), log, objects)
        probes.resume(step, _probed(ema, engine), settings.run_dir, partial(_engine_backbone, engine))
        hooks = Hooks(
            batches=partial(_on_device, feed, device),
            save=partial(_save, saver, engine, settings, recipe, world, feed, ema, objects),
            record=partial(_record, log, ProgressLine(recipe.total_steps, step), world),
            stop_requested=StopPoll(settings.control) if rank == 0 else (lambda: False),
            notice=saver.heed(
                Notices(plan.cadence.log_every, rank, world, plan.group, settings.control, log)
            ),
            after_step=partial(_after_step, ema, engine, probes),
        )
        images_per_step = batch.global_batch
        peak = peak_flops(device, recipe.bf16)
        throughput = Throughput(
            images_per_step=images_per_step,
            flops_per_step=train_flops(plan.architecture) * images_per_step,
            peak_flops=peak * world if peak else None,
            seq_len=getattr(plan.architecture, "seq_len", None),
        )
        end = pretrain_loop(
            engine,
            recipe,
            hooks,
            start_step=step,
            steps_per_epoch=plan.feed.steps_per_epoch,
            cadence=plan.cadence,
            throughput=throughput,
            seed=plan.seed,
        )
        saver.wait()  # a stop, a regroup and the end report a checkpoint that is in storage
        probes.collect(wait=True)  # every probe handed over is recorded (and its best kept) before the end
        if log is not None:  # every rank ends alike; rank 0 tells the driver how
            log.event(end.reason, step=end.step, **({"detail": end.detail} if end.detail else {}))
            ray.get(settings.control.ended.remote(end))


# ---------------------------------------------------------------- resume


def _engine(
    model: torch.nn.Module,
    recipe: Recipe,
    settings: WorkerSettings,
    world: int,
    scratch: Path,
    cleanup: ExitStack,
) -> tuple[Any, int, dict[str, Any] | None, list[Path]]:
    """The engine, restored from the newest checkpoint when there is one: (engine, step, its meta, its
    EMA files: every rank's that saved them)."""
    newest = newest_checkpoint(settings.run_dir) if ray.train.get_context().get_world_rank() == 0 else None
    newest = ray.train.collective.broadcast_from_rank_zero(newest)  # every rank loads the same one
    compiled = settings.plan.speed.compiles(ray.train.torch.get_device().type)
    if newest is None:
        return build_engine(model, recipe, settings.plan.zero, world, compile_model=compiled), 0, None, []
    filesystem, path = resolve(newest)  # a URL's query holds its filesystem's settings
    resume = ray.train.Checkpoint(path, filesystem=filesystem)
    folder = Path(cleanup.enter_context(resume.as_directory()))
    meta = json.loads((folder / META_FILE).read_text())
    ema_parts = ema_files(folder, meta)
    saved, wanted = architecture_of(meta, str(folder)), settings.plan.architecture
    if saved != wanted:
        changed = sorted(k for k, v in wanted.to_dict().items() if saved.to_dict().get(k) != v)
        raise ValueError(
            f"{folder}: the checkpoint holds another model ({saved.describe()}; differs in {changed})"
        )
    universal = meta["world_size"] != world and meta["zero_stage"] > 0
    if universal:  # written by another number of ranks: DeepSpeed's universal format reshards it
        folder = to_universal(folder, meta["tag"], scratch / "universal")
    engine = build_engine(
        model, recipe, settings.plan.zero, world, load_universal=universal, compile_model=compiled
    )
    try:
        load_checkpoint(engine, folder, meta["tag"])
    except (OSError, RuntimeError, EOFError, ValueError) as error:  # torch.load of a damaged file
        raise RuntimeError(
            f"{resume.path}: the checkpoint cannot be loaded: {type(error).__name__}: {error}"
        ) from error
    return engine, int(meta["step"]), meta, ema_parts


def _start_ema(engine: Any, decay: float | None, files: list[Path], step: int, rank: int) -> Ema | None:
    """The EMA of this rank's own part of the weights (pretrain.ema), resharded from the checkpoint's
    rank files whatever group wrote them; a checkpoint without them starts it from its weights."""
    if decay is None:
        return None
    ema = Ema(local_fragments(engine), decay)
    if files:
        ema.load(assemble(load_fragments(files), parameter_shapes(engine)))
    elif step and rank == 0:
        say(f"pretrain: EMA weights (decay {decay}) start from step {step:,}: its checkpoint holds none")
    return ema


def _after_step(ema: Ema | None, engine: Any, probes: ProbeClient, step: int) -> None:
    """After each optimizer step: the EMA takes the new weights in, and at a probe step the weights (raw,
    and EMA) are handed to the probes."""
    if ema is not None:
        ema.update()
    if probes.due(step):
        probes.submit(step, _probed(ema, engine), backbone=partial(_engine_backbone, engine))
    probes.collect(wait=False)


def _engine_backbone(engine: Any) -> str | None:
    """The digest of the engine's own in-memory weights, less the head (vit.weights.backbone_digest), which
    rank 0's raw probe record of a step carries: an export of that step, and a fine-tuning from it, are
    traced to them. Only where the module holds the weights themselves: None under ZeRO-3 (no rank holds
    the whole module) and under bf16 (the module holds bf16 copies of the fp32 weights the export holds)."""
    if engine.zero_optimization_stage() >= 3:
        return None
    if any(parameter.dtype != torch.float32 for parameter in engine.module.parameters()):
        return None
    return backbone_digest(engine.module)


def _probed(ema: Ema | None, engine: Any) -> dict[str, Fragments]:
    """The weights the probes score: this rank's part of the raw ones, and of their EMA when kept."""
    raw = ema.fragments if ema is not None else local_fragments(engine)
    return {"raw": raw, **({"ema": ema.pieces()} if ema is not None else {})}


def newest_checkpoint(run_dir: str) -> str | None:
    """The run folder's newest complete checkpoint (path or URL) as the group starts; None on a fresh run.

    The folder, not Ray Train's own record (`ray.train.get_checkpoint`): Ray Train registers a checkpoint
    only once every rank's report has reached its controller, so a checkpoint every rank wrote just before
    a node went (a preemption notice's) or before the driver died is in the folder, complete, and not in
    Ray Train's record; resuming from an older one would throw those steps away."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1].path if checkpoints else None


def _announce(
    log: MetricsLog | None, step: int, resumed: dict[str, Any] | None, world: int, recipe: Recipe, engine: Any
) -> None:
    """Rank 0 records where the ranks run and whether this launch started or resumed the run; a resume
    records the hash of the weights it loaded (whole on every rank below ZeRO-3), which a test compares
    with the checkpoint's own."""
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if log is None:
        return
    fields = {
        "step": step,
        "workers": world,
        "nodes": len(set(nodes)),
        "total_steps": recipe.total_steps,
        "threads": torch.get_num_threads(),
    }
    if resumed is None:
        log.event("started", **fields)
    else:
        loaded = {"weights": state_digest(engine.module)} if engine.zero_optimization_stage() < 3 else {}
        log.event("resumed", from_workers=resumed["world_size"], **fields, **loaded)
    before = int(resumed["world_size"]) if resumed is not None else world
    if before != world:
        accumulation = recipe.batch.accumulation
        log.event("resized", step=step, from_workers=before, workers=world, grad_accum=accumulation)
        say(
            f"pretrain: resized {before} -> {world} worker(s) at step {step} (same global batch: each "
            f"worker accumulates {recipe.batch.accumulation} micro-batch(es) a step; ZeRO state resharded)"
        )
    elif step:
        say(f"pretrain: resuming at step {step} on {world} worker(s)")
    else:
        detail(f"pretrain: starting on {world} worker(s)")


# ---------------------------------------------------------------- the loop's hooks


def _feed(
    settings: WorkerSettings,
    rank: int,
    world: int,
    step: int,
    resumed: dict[str, Any] | None,
    device: torch.device,
) -> Feed:
    """This rank's data from `step`: where the checkpoint says the epoch's ranks stood, or a fresh epoch."""
    saved = (resumed or {}).get("data") or {}
    epoch, position = divmod(step, settings.plan.feed.steps_per_epoch)
    same_epoch = saved.get("format") == ORDER_FORMAT and saved.get("epoch") == epoch
    lineage = extend_lineage(saved.get("lineage") if same_epoch else None, position, world)
    if resumed is not None and position and not same_epoch:  # written before positions were recorded
        before = int(resumed["world_size"])
        lineage = [(0, before), *([(position, world)] if before != world else [])]
    return Feed(settings.plan.feed, rank, world, step, lineage, pin=device.type == "cuda")


def _on_device(feed: Feed, device: torch.device, epoch: int, position: int) -> Iterator[Batch]:
    """The feed's micro-batches of `epoch` on the device: on a GPU each copied from pinned memory on a
    side stream while the step before it trains."""
    return prefetch_to_device(feed.batches(epoch, position), device)


def position_record(feed: Feed, step: int) -> dict[str, Any]:
    """Where every rank stands in the run's order after `step`: what a checkpoint records and a resume
    starts from (`pipeline.pretrain.order`)."""
    epoch, position = divmod(step, feed.plan.steps_per_epoch)
    lineage: Lineage = feed.lineage if epoch == feed.epoch else [(0, feed.world)]
    return {
        "format": ORDER_FORMAT,
        "epoch": epoch,
        "position": position,
        "lineage": [list(entry) for entry in lineage] if position else [],
    }


def _save(
    saver: Saver,
    engine: Any,
    settings: WorkerSettings,
    recipe: Recipe,
    world: int,
    feed: Feed,
    ema: Ema | None,
    objects: Any,
    step: int,
    epoch: int,
) -> None:
    """Every rank's shards (and its EMA pieces) into one `checkpoint_NNNNNNNN` folder of the run's storage,
    each rank's written and uploaded while training goes on (`pipeline.pretrain.saving`); rank 0 adds what
    the checkpoint is (vitpipe.json, `parts`: the rank records that make it complete). Ray Train keeps the
    newest `keep_checkpoints`."""
    meta = {
        "step": step,
        "epoch": epoch,
        "tag": tag_of(step),
        "world_size": world,
        "parts": world,
        "zero_stage": settings.plan.zero.stage,
        "bf16": recipe.bf16,
        **architecture_record(settings.plan.architecture),
        "classes": settings.plan.data.classes,
        "defines": settings.plan.identity,
        "data": position_record(feed, step),
        **({"ema": {"decay": ema.decay}} if ema is not None else {}),
    }
    # This save's mark, rank 0's on every rank: a record left by an earlier attempt at the step is not this.
    meta["attempt"] = from_rank_zero(uuid.uuid4().hex[:12], objects)
    pieces = ema.pieces() if ema is not None and ema.pieces().writes(saver.rank) else None
    saver.save(engine, step, meta["attempt"], meta if saver.rank == 0 else None, pieces)


def _record(log: MetricsLog | None, progress: ProgressLine, world: int, record: dict[str, Any]) -> None:
    """Rank 0 writes the step's (already all-reduced) metrics, with the group's size and the time, and
    prints its progress line."""
    if log is not None:
        log.write({**record, "workers": world, "time": round(time.time(), 3)})
        progress.report(record)


# ---------------------------------------------------------------- --data-only


def data_loop(config: dict[str, WorkerSettings]) -> None:
    """`vitpipe pretrain JOB --data-only`: the run's data path as training reads it (the rank's rows,
    the epochs, the copy to the device) with no training step; rank 0 records every step's rate and wait
    (the slowest rank's) into the folder's metrics.jsonl."""
    settings = config[SETTINGS]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    plan, recipe = settings.plan.feed, settings.plan.recipe
    batch = recipe.batch.on(world)
    with ExitStack() as cleanup:
        feed = cleanup.enter_context(closing(Feed(plan, rank, world, 0, [(0, world)], device.type == "cuda")))
        log = cleanup.enter_context(closing(MetricsLog(settings.run_dir))) if rank == 0 else None
        if log is not None:
            log.event("started", data_only=True, workers=world, total_steps=recipe.total_steps)
        started = time.perf_counter()
        for step in range(recipe.total_steps):
            epoch, position = divmod(step, plan.steps_per_epoch)
            if position == 0:
                batches = _on_device(feed, device, epoch, 0)
            began, waited = time.perf_counter(), 0.0
            for _ in range(batch.accumulation):
                asked = time.perf_counter()
                patches, _labels = next(batches)
                waited += time.perf_counter() - asked
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            slowest = torch.tensor([time.perf_counter() - began, waited], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds, waited = slowest.tolist()
            record = data_record(step + 1, epoch, seconds, waited, batch.global_batch, world, patches)
            if log is not None:
                log.write(record)
                if (step + 1) % settings.plan.cadence.log_every == 0 or step + 1 == recipe.total_steps:
                    line = data_line(record, recipe.total_steps, time.perf_counter() - started)
                    show_progress(line, step + 1, recipe.total_steps)
        if log is not None:
            log.event("finished", step=recipe.total_steps, data_only=True)


def data_record(
    step: int, epoch: int, seconds: float, waited: float, global_batch: int, world: int, patches: torch.Tensor
) -> dict[str, Any]:
    """A --data-only step's record: the same names as training's (`images_per_s`, `data_wait_s`), per
    worker too, and the bytes that reached the device."""
    per_image = patches[0].numel() * patches.element_size()
    return {
        "step": step,
        "epoch": epoch,
        "images_per_s": global_batch / seconds,
        "worker_images_per_s": global_batch / world / seconds,
        "worker_mb_per_s": global_batch / world * per_image / seconds / 1e6,
        "step_s": seconds,
        "data_wait_s": waited,
    }


def data_line(record: dict[str, Any], total: int, elapsed: float) -> str:
    return (
        f"data-only: step {record['step']}/{total} epoch {record['epoch']} "
        f"{record['images_per_s']:,.0f} img/s ({record['worker_images_per_s']:,.0f} per worker, "
        f"{record['worker_mb_per_s']:,.0f} MB/s) wait {record['data_wait_s'] * 1e3:,.1f} ms; {elapsed:,.0f} s"
    )
