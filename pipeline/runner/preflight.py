"""What `vitpipe run` checks before its first step, and `vitpipe validate` checks the same way: every
input from outside the run exists and is usable, and a pretraining run folder with checkpoints holds
this run (same defining settings; same model and data when the data is already there).

No Ray and no torch here: a refused job is refused in about a second.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError
from pipeline.datasets.build import planned_split_sizes
from pipeline.preprocess.manifest import MANIFEST_FILE, read_manifest
from pipeline.pretrain.plan import check_run_matches, plan_pretrain, training_split
from pipeline.runner.plan import JobPlan, Step, afresh_advice, load_plan
from pipeline.runner.records import external_fingerprints
from pipeline.storage import check_location, check_not_a_file, join, resolve
from pipeline.study.plan import Point, point_pretrain, study_job


def check_before_run(
    plan: JobPlan, steps: list[Step], *, pretrain_redone: bool, study_redone: bool = False
) -> dict[str, dict[str, str]]:
    """The outside inputs' fingerprints of each of `steps`, after the checks; a failure is a ConfigError
    naming the job file. A pretraining step (or study) redone on purpose (--force, --from) is not compared
    with the run it replaces."""
    if any(step.stage == "pretrain" for step in steps):
        try:
            check_location(plan.layout.pretrain_storage)  # a URL's options and endpoint, in one line
            check_not_a_file(plan.layout.pretrain_storage)
        except ValueError as error:
            raise ConfigError(f"{plan.source}: pretrain storage: {error}") from None
    externals = {step.id: external_fingerprints(plan, step) for step in steps}
    if not pretrain_redone and any(step.stage == "pretrain" for step in steps):
        check_pretrain_run(plan)
    if any(step.stage == "study" and not step.concurrent for step in steps):
        check_study_sizes(plan)
    for step in steps:
        if step.stage == "study" and step.concurrent and step.settings["pretrain"] and not study_redone:
            check_study_point_run(plan, step)
    return externals


def validated(job: Path, *, check_inputs: bool = True) -> str:
    """`vitpipe validate JOB`: everything `vitpipe run` checks before it starts (the inputs from outside
    the run too, unless not `check_inputs`); the verdict and the job resolved, as text."""
    plan = load_plan(job)
    if check_inputs:
        check_before_run(plan, plan.steps, pretrain_redone=False)
    steps = ", ".join(step.id for step in plan.steps)
    verdict = f"{job}: valid (config hash {plan.job.digest()}); steps: {steps}"
    return f"{verdict}\n{plan.job.model_dump_json(indent=2)}"


def check_pretrain_run(plan: JobPlan) -> None:
    """The run folder's checkpoints against the job's pretrain section: its defining settings always, and
    the model and the data's size too when the data is already preprocessed."""
    config = plan.job.pretrain
    if config is None:
        return
    data = plan.patch_dir(config.data)
    filesystem, manifest = resolve(join(data, MANIFEST_FILE))
    try:
        planned = plan_pretrain(config, data) if filesystem.get_file_info(manifest).is_file else None
        check_run_matches(plan.layout.pretrain, config, planned, afresh=afresh_advice(plan))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{plan.source}: pretrain: {error}") from None


def check_study_sizes(plan: JobPlan) -> None:
    """study.sizes against the images of the corpus's training split, where that is known before
    anything runs (a generated dataset's settings, else a patch directory's manifest): one error naming
    every size too large and the corpus size. Otherwise the subsets step checks when it draws."""
    study = study_job(plan.job, plan.source)
    known = _corpus_images(plan, study.corpus, study.pretrain.split)
    if known is None:
        return
    images, split, where = known
    too_big = [size for size in study.study.sizes if size > images]
    if too_big:
        raise ConfigError(
            f"{plan.source}: study.sizes {too_big}: the corpus {study.corpus!r} has {images:,} images in "
            f"split {split!r} ({where}); lower the sizes or use a larger corpus"
        )


def _corpus_images(plan: JobPlan, corpus: str, split: str) -> tuple[int, str, str] | None:
    """(images, split, where that was read) of a preprocess entry's training split, or None."""
    entry = plan.job.preprocess.get(corpus)
    source = entry.input if entry is not None and entry.input else corpus
    dataset = plan.job.datasets.get(source) if entry is not None else None
    sizes = planned_split_sizes(dataset) if dataset is not None else None
    if sizes is not None and split in sizes:
        return sizes[split], split, f"as datasets.{source} makes it"
    directory = plan.patch_dir(corpus)
    filesystem, manifest = resolve(join(directory, MANIFEST_FILE))
    if not filesystem.get_file_info(manifest).is_file:
        return None  # made by this run: the subsets step checks it when it draws
    split = training_split(directory, split)
    return read_manifest(directory)["splits"][split]["samples"], split, f"preprocessed in {directory}"


def check_study_point_run(plan: JobPlan, step: Step) -> None:
    """A study point's pretraining run folder against the point's settings, as for a pretrain step: a
    relaunch with another budget resumes it, one that changes what defines it is refused."""
    point = Point(**step.settings["point"])
    config = point_pretrain(study_job(plan.job, plan.source), point)
    run_dir = join(plan.layout.study_storage(point.name), "pretrain")
    try:
        redo = f"--force study --point {point.name}"
        check_run_matches(run_dir, config, redo=redo, afresh=afresh_advice(plan))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{plan.source}: {step.id}: {error}") from None
