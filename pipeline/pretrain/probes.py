"""Few-shot linear probes of the weights while pretraining runs (`pretrain.eval`), as big_vision's few-shot
evaluators do: a Ray actor beside the training group fits ridge probes on frozen features of each target's
training images and scores them on a validation split held out of those images (never the test split), and
keeps the best-scored weights of each kind (raw, EMA) in `RUN/best/KIND/`.

The plan (every check, on the driver before Ray) and the actor live here; the driver starts the actor once
per launch and hands it to the workers, which send it full fp32 state dicts.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.config import EvaluateConfig, digest
from pipeline.config.pretrain import ProbeSection
from pipeline.metrics import FEWSHOT_PREFIX
from pipeline.preprocess.manifest import read_manifest
from pipeline.pretrain.checkpoints import BEST_RECORD, best_dir, best_weights_name, read_best
from pipeline.ray_session import ray_task_device
from pipeline.storage import join, publish_folder, remove_entries, write_atomic
from pipeline.transfer.data import VALIDATION_BYTES, SplitReader, holdout, holdout_sizes
from pipeline.transfer.plan import TRAIN_SPLIT, TargetError, TargetPlan, check_fits, plan_target
from vit.config import Architecture
from vit.evaluate import Batch, extract_features
from vit.fewshot import fewshot_scores, sample_shots
from vit.weights import adapted_model, save_pretrained

BEST_RESET = "best reset: probes changed"
PROBE_NICENESS = 10  # how far a CPU prober lowers its priority below the training workers'
PROBER_RESTARTS = 2  # a restarted prober reloads its targets and its best from RUN/best
KIND = re.compile(r"[a-z][a-z0-9_-]*")  # a kind of weights names a folder


@dataclass(frozen=True)
class ProbeTarget:
    """A target as the probes see it: its training split, the shot counts probed on it, those skipped
    (each with why) and the size of its validation hold-out."""

    target: TargetPlan
    shots: tuple[int, ...]
    skipped: dict[int, str]
    validation_images: int

    @property
    def name(self) -> str:
        return self.target.name


@dataclass(frozen=True)
class ProbePlan:
    """What the prober does, worked out before Ray: the targets, the draws (shot counts x `seeds`), the
    ridge penalty, the hold-out, which shot count picks the best step, and what the actor takes."""

    targets: tuple[ProbeTarget, ...]
    architecture: Architecture  # the pretrained model's
    every: int  # steps between probes
    shots: tuple[int, ...]
    seeds: tuple[int, ...]  # the seed of each draw of a shot count
    l2: float
    val_fraction: float
    holdout_seed: int
    select_shots: int
    batch_size: int
    cpus: float
    gpus: float
    key: str  # `probe_key`: a recorded best is comparable only under the same key

    def needs(self) -> dict[str, float]:
        """What the prober takes of the cluster, beside the training group."""
        return {"CPU": self.cpus, "GPU": self.gpus}

    @property
    def metric(self) -> str:
        """What `score` is, in words (best.json records it)."""
        names = ", ".join(target.name for target in self.targets)
        return (
            f"validation top-1 of {self.select_shots}-shot ridge probes, mean over {len(self.seeds)} draw(s) "
            f"and the target(s) {names}"
        )

    def describe(self) -> list[str]:
        """A line per target for the driver to say, with the shot counts skipped on it and why."""
        lines = [f"probes: every {self.every} steps; best step by the {self.metric}"]
        for target in self.targets:
            skipped = "".join(f"; {shots}-shot skipped: {why}" for shots, why in target.skipped.items())
            lines.append(
                f"probes: {target.name}: {', '.join(map(str, target.shots))}-shot x {len(self.seeds)} "
                f"draw(s), scored on {target.validation_images} validation images{skipped}"
            )
        return lines


def plan_probes(
    section: ProbeSection,
    targets: dict[str, str],
    evaluate: EvaluateConfig | None,
    architecture: Architecture,
    *,
    seed: int = 0,
) -> ProbePlan:
    """Every check of `pretrain.eval` before Ray: each target (name -> patch directory) is labelled, has a
    train split, fits the model, and keeps a validation split; shot counts a class has too few images for
    after the hold-out are skipped, with why. `evaluate` gives the defaults of shots, seeds and l2; `seed`
    draws the hold-out (and, counting up, the few-shot draws). Errors name the key and the target."""
    defaults = evaluate or EvaluateConfig()
    shots = section.shots or defaults.shots
    seeds = tuple(seed + offset for offset in range(section.seeds or defaults.seeds))
    if not targets:
        raise ValueError("eval.targets: no target to probe (name targets, or finetune.targets)")
    if section.select_shots is not None and section.select_shots not in shots:
        raise ValueError(
            f"eval.select_shots {section.select_shots} is not one of the probed shot counts {list(shots)} "
            "(eval.shots, by default evaluate.shots)"
        )
    probed = tuple(
        _probe_target(name, directory, architecture, shots, section.val_fraction)
        for name, directory in targets.items()
    )
    select = section.select_shots or _default_selection(probed, shots)
    for target in probed:
        if select in target.skipped:
            raise TargetError(
                f"eval.select_shots {select}: target {target.name!r} cannot be probed {select}-shot: "
                f"{target.skipped[select]}. Choose a smaller select_shots"
            )
    l2 = section.l2_regularization or defaults.l2_regularization
    key = probe_key(probed, shots, seeds, l2, section.val_fraction, select)
    return ProbePlan(
        targets=probed,
        architecture=architecture,
        every=section.every,
        shots=shots,
        seeds=seeds,
        l2=l2,
        val_fraction=section.val_fraction,
        holdout_seed=seed,
        select_shots=select,
        batch_size=section.batch_size,
        cpus=section.cpus,
        gpus=section.gpus,
        key=key,
    )


def _probe_target(
    name: str, directory: str, architecture: Architecture, shots: tuple[int, ...], val_fraction: float
) -> ProbeTarget:
    """One target planned as transfer plans it (`plan_target`, `check_fits`), and its hold-out's sizes."""
    try:
        target = plan_target(name, directory)
        check_fits(target, architecture, "pretrain.model")
    except TargetError as error:
        raise TargetError(f"eval.targets: {error}") from None
    counts = np.array(target.class_counts, np.int64)
    held = holdout_sizes(counts, val_fraction, VALIDATION_BYTES // target.geometry.sample_bytes)
    if not held.sum():
        raise TargetError(
            f"eval.val_fraction {val_fraction:g}: target {name!r} keeps no validation image of its "
            f"{target.train_samples:,} training images (at most {counts.max()} of a class; a class gives one "
            "only when it has two or more). Give each class two or more training images"
        )
    left = counts - held
    skipped = {}
    for count in shots:
        short = np.flatnonzero(left < count)
        if len(short):
            label = int(short[0])
            skipped[count] = (
                f"class {target.classes[label]!r} has {left[label]} training image(s) left after the "
                f"validation hold-out, fewer than {count}"
            )
    probed = tuple(count for count in shots if count not in skipped)
    return ProbeTarget(target, probed, skipped, int(held.sum()))


def _default_selection(targets: tuple[ProbeTarget, ...], shots: tuple[int, ...]) -> int:
    """The largest shot count probed on every target."""
    common = [count for count in shots if all(count in target.shots for target in targets)]
    if not common:
        reasons = "; ".join(
            f"{target.name}: {min(target.skipped)}-shot: {target.skipped[min(target.skipped)]}"
            for target in targets
            if target.skipped
        )
        raise TargetError(f"eval.shots {list(shots)}: no shot count is probed on every target ({reasons})")
    return max(common)


def probe_key(
    targets: tuple[ProbeTarget, ...],
    shots: tuple[int, ...],
    seeds: tuple[int, ...],
    l2: float,
    val_fraction: float,
    select_shots: int,
) -> str:
    """What makes two probes' scores comparable: the targets' training data (by name, what their manifests
    record of it, and their class counts; not where they lie), the draws, the penalty and the hold-out."""
    data = {}
    for probed in targets:
        manifest = read_manifest(probed.target.directory)
        data[probed.name] = {
            "config_hash": manifest.get("config_hash"),
            "classes": manifest.get("classes"),
            "patches": manifest.get("patches"),
            "train": manifest["splits"][TRAIN_SPLIT],
            "class_counts": list(probed.target.class_counts),
        }
    settings = {"shots": list(shots), "seeds": list(seeds), "l2": l2, "val_fraction": val_fraction}
    return digest({"targets": data, **settings, "select_shots": select_shots})


def score_name(target: str, shots: int) -> str:
    """A probe record's key of a target's mean validation top-1 at a shot count (`_std` after it: the
    spread over the draws)."""
    return f"{FEWSHOT_PREFIX}{target}/{shots}shot"


# --- the actor: Ray runs it beside the training group ---------------------------------------------------


@dataclass(frozen=True)
class LoadedTarget:
    """A target's rows the probes read, held in memory as patches: every row some few-shot draw takes, the
    draws as positions among them (one per seed, per shot count), and the validation rows."""

    spec: ProbeTarget
    fewshot: tuple[np.ndarray, np.ndarray]  # patches, labels
    draws: dict[int, list[np.ndarray]]
    validation: tuple[np.ndarray, np.ndarray]


def load_target(spec: ProbeTarget, plan: ProbePlan) -> LoadedTarget:
    """Read a target's training split once: the validation rows (`holdout`, as fine-tuning carves its
    own) and the few-shot draws (`sample_shots`) from the rows left."""
    reader = SplitReader(spec.target.directory, TRAIN_SPLIT)
    labels = reader.labels()
    max_rows = VALIDATION_BYTES // reader.geometry.sample_bytes
    held_out = holdout(labels, plan.val_fraction, plan.holdout_seed, max_rows)
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    classes = len(spec.target.classes)
    drawn = {
        shots: [rest[sample_shots(labels[rest], classes, shots, seed)] for seed in plan.seeds]
        for shots in spec.shots
    }
    needed = np.unique(np.concatenate([rows for seeded in drawn.values() for rows in seeded]))
    draws = {shots: [np.searchsorted(needed, rows) for rows in seeded] for shots, seeded in drawn.items()}
    return LoadedTarget(spec, _read_rows(reader, needed), draws, _read_rows(reader, held_out))


def _read_rows(reader: SplitReader, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    patches, labels = zip(*reader.take(rows, len(rows)), strict=True)
    return np.concatenate(patches), np.concatenate(labels)


def _batches(rows: tuple[np.ndarray, np.ndarray], size: int) -> Iterator[Batch]:
    patches, labels = rows
    for start in range(0, len(labels), size):
        yield patches[start : start + size], labels[start : start + size]


class Prober:
    """Probes weights sent by the workers, one call at a time, and keeps the best of each kind.

    `ray.remote(Prober)` is made where it is started (`start_prober`); the class itself is plain."""

    def __init__(self, plan: ProbePlan, run_dir: str) -> None:
        self.plan, self.run_dir = plan, run_dir
        torch.set_num_threads(max(1, int(plan.cpus)))
        self.device = ray_task_device()
        if self.device.type == "cpu":
            # The prober shares the nodes' cores with the training workers: at a lower priority it takes the
            # cycles they leave idle (waiting on data, on collectives) instead of slowing their steps. Ray
            # starts its workers at niceness 15 (RAY_worker_niceness), so this reaches the floor, 19. The
            # process is this actor's own and ends with it.
            os.nice(PROBE_NICENESS)
        self.targets = [load_target(target, plan) for target in plan.targets]
        self._best: dict[str, dict[str, Any] | None] = {}
        self._notes: dict[str, str] = {}  # said in the next record of the kind
        self._history: list[dict[str, Any]] = []

    def probe(self, step: int, images_seen: int, kind: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Score the full fp32 `state` (the pretrained model's parameters) of `kind` at `step`; returns
        one flat record: `fewshot/TARGET/Kshot` (mean over the draws) and `..._std` of every shot count
        probed, `skipped` (those not), `score` and the kind's best step and score after this probe."""
        if not KIND.fullmatch(kind):
            raise ValueError(f"probe kind {kind!r}: not a name (lower-case letters, digits, - and _)")
        source = f"the {kind} weights of step {step}"
        record: dict[str, Any] = {"probe": kind, "step": step, "images_seen": images_seen}
        for loaded in self.targets:
            record |= self._scores(loaded, state, source)
        skipped = [f"{target.name}/{shots}shot" for target in self.plan.targets for shots in target.skipped]
        if skipped:
            record["skipped"] = skipped
        selected = [record[score_name(target.name, self.plan.select_shots)] for target in self.plan.targets]
        record |= {"score": float(np.mean(selected)), "metric": self.plan.metric, "probe_key": self.plan.key}
        best = self._keep_best(kind, record, state, source)
        record |= {"best_step": best["step"], "best_score": best["score"]}
        if kind in self._notes:
            record["note"] = self._notes.pop(kind)
        self._history.append(record)
        return record

    def best(self, kind: str) -> dict[str, Any] | None:
        """The kind's best as best.json records it (this launch's, or a resumed run's under the same
        probes), or None."""
        return self._best_of(kind)

    def history(self) -> list[dict[str, Any]]:
        """Every record this prober returned, in order."""
        return list(self._history)

    @torch.no_grad()
    def _scores(self, loaded: LoadedTarget, state: dict[str, torch.Tensor], source: str) -> dict[str, float]:
        """The target's few-shot table on its validation rows, with the model adapted to its geometry as
        transfer's probe adapts it (the pre-logits layer kept, position embeddings resampled)."""
        architecture, geometry = self.plan.architecture, loaded.spec.target.geometry
        changes = {"image_size": geometry.image_size, "patch_size": geometry.patch_size}
        overrides = {field: value for field, value in changes.items() if field in architecture.adaptable}
        model = adapted_model(state, architecture, source, **overrides).to(self.device)
        size = self.plan.batch_size
        features, labels = extract_features(model, _batches(loaded.fewshot, size), self.device)
        val_features, val_labels = extract_features(model, _batches(loaded.validation, size), self.device)
        classes, l2 = len(loaded.spec.target.classes), self.plan.l2
        table = fewshot_scores(features, labels, loaded.draws, val_features, val_labels, classes, l2)
        scores = {}
        for shots, accuracies in table.items():
            scores[score_name(loaded.spec.name, shots)] = float(np.mean(accuracies))
            scores[score_name(loaded.spec.name, shots) + "_std"] = float(np.std(accuracies))
        return scores

    def _best_of(self, kind: str) -> dict[str, Any] | None:
        """The kind's best to beat; read once from RUN/best/KIND/best.json, kept only under the same key."""
        if kind not in self._best:
            try:
                stored = read_best(best_dir(self.run_dir, kind))
            except ValueError as error:  # the probes find the best again rather than fail every probe
                self._notes[kind], stored = f"{BEST_RESET}: {error}", None
            if stored is not None and stored.get("probe_key") != self.plan.key:
                self._notes[kind] = (
                    f"{BEST_RESET} (the best of step {stored.get('step')} was scored under probe key "
                    f"{stored.get('probe_key')}, these probes' is {self.plan.key})"
                )
                stored = None
            self._best[kind] = stored
        return self._best[kind]

    def _keep_best(
        self, kind: str, record: dict[str, Any], state: dict[str, torch.Tensor], source: str
    ) -> dict[str, Any]:
        """The kind's best after this record: a higher score than the best's writes the weights."""
        best = self._best_of(kind)
        if best is not None and record["score"] <= best["score"]:
            return best
        best = {
            "kind": kind,
            "step": record["step"],
            "images_seen": record["images_seen"],
            "score": record["score"],
            "metric": self.plan.metric,
            "probe_key": self.plan.key,
        }
        write_best(best_dir(self.run_dir, kind), adapted_model(state, self.plan.architecture, source), best)
        self._best[kind] = best
        return best


def write_best(folder: str, model: torch.nn.Module, best: dict[str, Any]) -> None:
    """The model as a vitpipe folder in `folder/step-NNNNNNNN`, then `best` (naming it) as best.json, then
    the older step folders go: a kill at any point leaves a best.json whose weights are whole."""
    name = best_weights_name(int(best["step"]))
    with tempfile.TemporaryDirectory(prefix="vitpipe-best-") as scratch:
        save_pretrained(model, Path(scratch) / name)
        publish_folder(Path(scratch), folder)
    write_atomic(join(folder, BEST_RECORD), json.dumps({**best, "folder": name}, indent=2) + "\n")
    remove_entries(folder, lambda entry: entry != name and entry.startswith("step-"))


def start_prober(plan: ProbePlan, run_dir: str) -> ray.actor.ActorHandle:
    """The driver's prober for one launch, on the CPUs and GPUs the plan gives it, beside the training
    group; handed to the workers, it outlives their regroups and ends with the driver."""
    actor = ray.remote(Prober).options(num_cpus=plan.cpus, num_gpus=plan.gpus, max_restarts=PROBER_RESTARTS)
    return actor.remote(plan, run_dir)
