"""The pretrain section: what defines a run, how it is operated, and its budget. What a run derives
from it (the recipe, the batch split, the worker group) is worked out in `pipeline.pretrain.plan`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import (
    BatchSize,
    CropSection,
    Flag,
    Float,
    Name,
    NonNegativeFloat,
    NonNegativeInt,
    OptimizerSection,
    PositiveFloat,
    PositiveInt,
    ScheduleSection,
    Section,
    StepBudget,
    UnitFraction,
    WorkerCount,
)
from pipeline.config.model import AnyModel, ModelConfig
from vit.recipe import BatchSplit, Optimizer, Schedule, Speed, Zero

# How a pretraining run is operated, not what it trains: a relaunch with other values resumes the run
# (across world sizes the checkpoint is resharded; the global batch stays, its micro-batch split may not).
PRETRAIN_OPERATIONAL = frozenset({
    "data", "storage_path", "num_workers", "use_gpu", "cpus_per_worker", "data_threads",
    "placement", "micro_batch_size", "checkpoint_every", "keep_checkpoints", "max_failures",
    "log_every", "elastic_wait_s", "compile", "activation_checkpointing", "tf32", "overlap_comm",
    "reduce_bucket_size", "allgather_bucket_size", "grad_reduce_dtype", "checkpoint_async", "eval", "ema",
    "export",
})  # fmt: skip
# Operational keys that change what the pretrain step writes (its probes, EMA weights and export), though
# not the run: in the step's cache key, so a change reruns the step, which resumes the run.
PRETRAIN_OUTPUTS = frozenset({"eval", "ema", "export"})
# How the probes run, not what they measure: out of the pretrain step's key.
PROBE_OPERATIONAL = frozenset({"cpus", "gpus", "batch_size"})
# Keys of the data path before each worker read its own rows (Ray Data): refused, saying what replaced them.
PRETRAIN_RETIRED = {
    "data_cpus": "replaced by data_threads (each worker reads its own rows with that many threads, "
    "inside its cpus_per_worker)",
    "cache_data": "replaced by streaming (each worker reads its rows from the files every epoch, ahead "
    "of the trainer, with data_threads threads and a shuffle_buffer)",
}
# The budget: a relaunch with another one resumes the run and trains to the new end.
PRETRAIN_BUDGET = frozenset({"steps", "epochs"})


class ProbeSection(Section):
    """Few-shot linear probes of the weights while pretraining runs (`pretrain.eval`), big_vision's
    few-shot evaluators: every `every` steps, the current weights (and the EMA weights, with `ema`) are
    probed on each target by ridge regression on frozen features, scored on a validation split carved from
    the target's training data (never its test split), as Ray work beside the training group."""

    every: StepBudget  # steps between probes
    # Preprocessed patch directories, or in a job the names of preprocess entries; default: finetune.targets.
    targets: list[str] | None = Field(None, min_length=1)
    shots: tuple[PositiveInt, ...] | None = None  # default: the evaluate section's shots
    seeds: PositiveInt | None = None  # draws of each shot count; default: the evaluate section's
    l2_regularization: PositiveFloat | None = None  # default: the evaluate section's
    val_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.1  # of each target's train split, held out
    # The shot count whose validation top-1, averaged over the targets, picks the best step; default: the
    # largest of `shots`.
    select_shots: PositiveInt | None = None
    batch_size: BatchSize = 256  # images per forward pass of a probe
    cpus: PositiveFloat = 1.0  # what the probing actor takes of the cluster, beside the training group
    gpus: NonNegativeFloat = 0.0

    @field_validator("shots")
    @classmethod
    def _sorted_shots(cls, shots: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if shots is None else tuple(sorted(set(shots)))


class EmaSection(Section):
    """An exponential moving average of the weights (timm's `--model-ema`), kept in fp32 beside the
    optimizer: every rank averages its own part of the master weights after every step, under any ZeRO
    stage; saved in each checkpoint, resharded with it, probed and exported beside the raw weights."""

    decay: Annotated[Float, Field(gt=0, lt=1)] = 0.9999


class ExportSection(Section):
    """Which weights the run's export holds (what fine-tuning reads): the last step's or the step the
    probes scored best (`select: best` needs `eval`), raw or EMA (`weights: ema` needs `ema`); with EMA on,
    the other kind is exported beside them."""

    select: Literal["last", "best"] = "last"
    weights: Literal["raw", "ema"] = "raw"


class PretrainConfig(Section):
    """DeepSpeed ZeRO pretraining on Ray Train; the batch is global and must split evenly.

    Settings divide into those that define the run (the model, the global batch, the optimizer and
    schedule, augmentation, precision, ZeRO stage, seed; a relaunch that changes one is refused) and the
    operational ones and the budget above (a relaunch that changes them resumes)."""

    data: str  # a preprocessed patch directory (path or URL), or in a job the name of a preprocess entry
    split: Name = "train"  # the split to train on; a patch directory without sub-folders has only "."
    model: AnyModel = ModelConfig()
    # Ray Train workers: a fixed number, or [min, max] for an elastic run, which starts on what the cluster
    # offers up to max, goes on with fewer (at least min) from the newest checkpoint when a node is lost,
    # and grows back at a checkpoint when resources return; the global batch stays, accumulation follows.
    num_workers: WorkerCount = 2
    # How long an elastic run waits for the cluster to place `min` workers before it fails.
    elastic_wait_s: PositiveFloat = 600.0
    use_gpu: Flag = False
    cpus_per_worker: PositiveFloat = 1.0
    # Threads each worker reads its rows of the patch files with, ahead of the trainer (pyarrow releases
    # the GIL); more help when the files are remote (s3://, gs://) or compressed.
    data_threads: Annotated[int, Field(ge=1, le=64)] = 2
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # how workers go onto nodes
    global_batch_size: BatchSize = 4096
    micro_batch_size: BatchSize = 64
    steps: StepBudget = 100_000
    epochs: StepBudget | None = None  # a budget in passes over the data instead of `steps`
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Flag = False
    bf16: Literal["auto"] | Flag = "auto"  # auto: on GPUs that support it (Ampere and newer), else fp32
    optimizer: OptimizerSection = Optimizer()
    schedule: ScheduleSection = Schedule()
    label_smoothing: UnitFraction = 0.0
    # The model's resolution; default: the stored one (preprocess.image_size). A smaller one is a centre
    # crop of the stored images, or with `crop` a random resized crop, on the device.
    image_size: PositiveInt | None = None
    # The paper's random ("Inception") crop; `{}` for its defaults: area 8-100%, aspect 3/4-4/3.
    crop: CropSection | None = None
    flip: Flag = True  # random horizontal flips, on the device
    mixup_alpha: NonNegativeFloat = 0.0  # 0 turns mixup off
    # Consecutive rows of the epoch's file order (drawn anew each epoch) permuted together; 0 reads each
    # file's rows in their order.
    shuffle_buffer: NonNegativeInt = 2048
    checkpoint_every: PositiveInt = 1000
    # A checkpoint is copied to host memory while training waits, then written and uploaded in the
    # background (false: written and uploaded before the next step, as before).
    checkpoint_async: Flag = True
    keep_checkpoints: PositiveInt = 3
    max_failures: NonNegativeInt = 3  # worker-group restarts from the latest checkpoint before giving up
    log_every: PositiveInt = 10
    storage_path: str | None = None
    seed: NonNegativeInt = 0
    # GPU speed: how a step runs, never what it computes (a relaunch that changes one resumes the run).
    compile: Literal["auto"] | Flag = "auto"  # torch.compile of the model; auto: on GPUs
    activation_checkpointing: Flag = False  # recompute each block in backward: less memory, ~1/3 more compute
    tf32: Flag = True  # TF32 tensor cores for the fp32 matmuls left outside bf16 (CUDA only)
    # Gradients reduced over the ranks and accumulated over micro-batches in fp32 under bf16; bf16 halves
    # the bytes on the wire at the cost of precision (benchmarks/results/grad_reduce.json).
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    overlap_comm: Flag = True  # ZeRO 2-3 reduce while backward goes on (not stage 1 under bf16)
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction
    allgather_bucket_size: int | None = None  # per weight gather (stage 3: prefetch); None: DeepSpeed's
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    eval: ProbeSection | None = None  # few-shot probes while training runs; off by default
    ema: EmaSection | None = None  # EMA weights; off by default
    export: ExportSection = ExportSection()

    @model_validator(mode="before")
    @classmethod
    def _no_retired_keys(cls, data: Any) -> Any:
        retired = [key for key in PRETRAIN_RETIRED if isinstance(data, dict) and key in data]
        if retired:
            told = "; ".join(f"{key} is retired: {PRETRAIN_RETIRED[key]}" for key in retired)
            raise ValueError(f"{told}; drop {' and '.join(retired)} from the job")
        return data

    @model_validator(mode="after")
    def _batch_splits(self) -> PretrainConfig:
        uneven = [w for w in range(self.min_workers, self.max_workers + 1) if not self._splits_on(w)]
        if uneven and not self.elastic:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {self.micro_batch_size} x {self.num_workers}"
            )
        if uneven:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} does not split into micro-batches of "
                f"{self.micro_batch_size} over {' or '.join(map(str, uneven))} worker(s); an elastic run "
                f"(num_workers {list(self.num_workers)}) may train on any number from {self.min_workers} to "
                f"{self.max_workers}: choose a global batch that micro_batch_size x each of them divides"
            )
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError("set either steps or epochs, not both")
        self.zero()  # the ZeRO settings' own checks (bucket sizes, derived raw keys)
        if self.export.select == "best" and self.eval is None:
            raise ValueError("export.select: best is the step the probes scored best: set eval: {every: N}")
        if self.export.weights == "ema" and self.ema is None:
            raise ValueError("export.weights: ema exports the EMA weights: set ema: {decay: 0.9999}")
        return self

    def _splits_on(self, workers: int) -> bool:
        try:
            BatchSplit(self.global_batch_size, self.micro_batch_size, workers)
        except ValueError:
            return False
        return True

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def zero(self) -> Zero:
        return Zero(
            self.zero_stage,
            self.offload_optimizer,
            dict(self.deepspeed),
            self.grad_reduce_dtype,
            self.overlap_comm,
            self.reduce_bucket_size,
            self.allgather_bucket_size,
        )

    def speed(self) -> Speed:
        return Speed(self.compile, self.activation_checkpointing, self.tf32)


def pretrain_key(pretrain: PretrainConfig) -> dict[str, Any]:
    """What of a pretrain section a step's results depend on (its cache key): less how it is operated, but
    with what it probes, keeps and exports, less how the probes run. The budget stays: a longer `steps` is
    more training (the step resumes the run to it)."""
    settings = pretrain.model_dump(mode="json", exclude=PRETRAIN_OPERATIONAL - PRETRAIN_OUTPUTS)
    if pretrain.eval is not None:
        settings["eval"] = pretrain.eval.model_dump(mode="json", exclude=PROBE_OPERATIONAL)
    return settings
