"""A whole job: its datasets, preprocess entries and stages, the study, tracking; and the checks that
span sections (a study's recipe, patch sizes taken from the models that read an entry)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Flag, Name, NonNegativeInt, PositiveInt, Section, StepBudget
from pipeline.config.data import DatasetConfig, PreprocessConfig
from pipeline.config.model import AnyModel
from pipeline.config.pretrain import PretrainConfig, ProbeSection
from pipeline.config.transfer import AnalyzeConfig, EvaluateConfig, FinetuneConfig


class StudyConfig(Section):
    """Transfer as a function of pretraining data size (the paper's Figures 3 and 4): each (size, model,
    seed) point is pretrained on a nested random subset of the corpus with the job's pretrain section as
    its recipe, then fine-tuned and few-shot evaluated on every finetune target."""

    corpus: Name | None = None  # the preprocess entry the subsets are drawn from; default: pretrain.data
    sizes: tuple[PositiveInt, ...] = Field(min_length=1)  # pretraining images of each point
    models: dict[Name, AnyModel] = Field(min_length=1)  # the models compared, by the name the report uses
    seeds: tuple[NonNegativeInt, ...] = Field((0,), min_length=1)  # each point's pretrain and finetune seed
    # The budget of every point: passes over its subset (the paper's rule: more data, more steps) or a
    # fixed number of steps at every size. Default: the pretrain section's epochs, else its steps.
    epochs: StepBudget | None = None
    steps: StepBudget | None = None
    # With epochs, the fewest steps a point takes: a small subset's few passes would stop it before it
    # learns anything, while the best step the probes find (pretrain.eval) stops its overfitting.
    min_steps: PositiveInt | None = None
    scratch: Flag = True  # also each model trained from scratch on each target: the size-0 row
    subset_seed: NonNegativeInt = 0  # draws the nested subsets, once for every model and seed

    @field_validator("sizes", "seeds")
    @classmethod
    def _distinct_and_sorted(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(values)) != len(values):
            raise ValueError(f"a value is listed twice: {list(values)}")
        return tuple(sorted(values))

    @model_validator(mode="after")
    def _one_budget(self) -> StudyConfig:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("set either epochs or steps, not both")
        if self.min_steps is not None and self.epochs is None:
            raise ValueError(
                "min_steps is a floor under study.epochs: set study.epochs, or a fixed study.steps alone"
            )
        return self


class WandbConfig(Section):
    """Weights & Biases: runs in `project`; `offline` writes them under RUN/tracking (`wandb sync` later)."""

    project: Name
    mode: Literal["online", "offline"] = "online"
    entity: str | None = None
    dir: str | None = None  # where W&B writes its files (default RUN/tracking)


class TrackingConfig(Section):
    """Experiment tracking: an MLflow tracking URI (a local path, sqlite:///FILE, or http://SERVER) and/or
    W&B. Operational: it changes no cache key, and a run that cannot reach its tracker still trains."""

    mlflow: str | None = None
    experiment: Name | None = None  # the MLflow experiment (default: the job's name)
    wandb: WandbConfig | None = None

    @model_validator(mode="after")
    def _tracks_something(self) -> TrackingConfig:
        if self.mlflow is None and self.wandb is None:
            raise ValueError(
                "tracking needs mlflow: URI and/or wandb: {project: ...}; drop the section to track nothing"
            )
        return self


class PipelineConfig(Section):
    """A whole job: datasets, then preprocess, pretrain, fine-tune and evaluate (or, with a study, the
    study's points, each a pretraining and its transfer)."""

    name: Name
    run_dir: str | None = None  # the run's folder (all stage outputs); default runs/NAME
    datasets: dict[Name, DatasetConfig] = Field(default_factory=dict)
    preprocess: dict[Name, PreprocessConfig] = Field(default_factory=dict)
    pretrain: PretrainConfig | None = None
    finetune: FinetuneConfig | None = None
    evaluate: EvaluateConfig | None = None
    study: StudyConfig | None = None
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    tracking: TrackingConfig | None = None

    @model_validator(mode="after")
    def _study_has_its_recipe(self) -> PipelineConfig:
        if self.study is None:
            return self
        if self.pretrain is None or self.finetune is None:
            raise ValueError(
                "a study needs a pretrain section (its points' recipe) and a finetune section "
                "(the targets each point is evaluated on)"
            )
        probed = set(self.pretrain.eval.targets or ()) if self.pretrain.eval is not None else set()
        if unknown := sorted(probed - set(self.finetune.targets)):
            raise ValueError(
                f"pretrain.eval.targets {unknown}: a study's points probe "
                "only the finetune targets they transfer to; drop them, or add them to finetune.targets"
            )
        if "model" in self.pretrain.model_fields_set:
            raise ValueError("pretrain.model is not used by a study: its points train study.models; drop it")
        corpus = self.study.corpus or self.pretrain.data
        if corpus not in self.preprocess:
            raise ValueError(f"study.corpus {corpus!r} is not a preprocess entry of this job")
        sizes = {model.reads_patch_size for model in self.study.models.values()} - {None}
        if len(sizes) > 1:
            raise ValueError(
                f"study.models read patches of sizes {sorted(sizes)}; the corpus and the targets are "
                "preprocessed once, so every ViT of a study has one patch size"
            )
        return self

    @model_validator(mode="after")
    def _probes_have_targets(self) -> PipelineConfig:
        probes = self.pretrain.eval if self.pretrain is not None else None
        if probes is not None and probes.targets is None and self.finetune is None:
            raise ValueError(
                "pretrain.eval probes target datasets: set pretrain.eval.targets (preprocess entries or "
                "patch folders) or add a finetune section, whose targets it probes"
            )
        resolved = self.probes()
        if resolved is not None and resolved.select_shots not in (None, *(resolved.shots or ())):
            raise ValueError(
                f"pretrain.eval.select_shots {resolved.select_shots} is not one of the shots probed "
                f"{list(resolved.shots or ())} (evaluate.shots unless pretrain.eval.shots is set)"
            )
        return self

    def probes(self) -> ProbeSection | None:
        """pretrain.eval with what it leaves unset taken from the job: the finetune targets, and the evaluate
        section's shots, seeds and regularisation (a job writes them once)."""
        probes = self.pretrain.eval if self.pretrain is not None else None
        if probes is None:
            return None
        evaluate = self.evaluate or EvaluateConfig()
        targets = self.finetune.targets if self.finetune is not None else None
        return probes.model_copy(
            update={
                "targets": probes.targets or targets,
                "shots": probes.shots or evaluate.shots,
                "seeds": probes.seeds or evaluate.seeds,
                "l2_regularization": probes.l2_regularization or evaluate.l2_regularization,
            }
        )

    def models_reading(self, entry: str) -> list[AnyModel]:
        """The model sections that read a preprocess entry: the pretrain model (or a study's models) for
        the pretraining data, the corpus and every finetune target."""
        if self.pretrain is None:
            return []
        targets = self.finetune.targets if self.finetune is not None else []
        probed = self.pretrain.eval.targets if self.pretrain.eval is not None else None
        targets = [*targets, *(probed or [])]
        corpus = (self.study.corpus or self.pretrain.data) if self.study is not None else self.pretrain.data
        if entry != corpus and entry not in targets:
            return []
        return list(self.study.models.values()) if self.study is not None else [self.pretrain.model]

    @model_validator(mode="after")
    def _patch_sizes_from_models(self) -> PipelineConfig:
        """A preprocess entry without `patch_size` takes the patch size of the model that reads it, so a
        job writes the patch size once (in the model)."""
        for name, entry in self.preprocess.items():
            if entry.patch_size is not None:
                continue
            readers = self.models_reading(name)
            sizes = [model.reads_patch_size for model in readers if model.reads_patch_size is not None]
            targets = self.finetune.targets if self.finetune is not None else []
            if not sizes and self.pretrain is None and name in targets:
                raise ValueError(
                    f"preprocess.{name}.patch_size is not set, and the job has no pretrain model to take it "
                    "from (finetune.weights are read only when it runs); set it to the weights' patch size"
                )
            if not sizes:
                why = "only a BiT, which reads any patch size," if readers else "no model of this job"
                raise ValueError(
                    f"preprocess.{name}.patch_size is not set and {why} reads {name!r} (pretrain.data, the "
                    "study's corpus or a finetune target); set it"
                )
            size = sizes[0]
            self.preprocess[name] = PreprocessConfig.model_validate(
                {**entry.model_dump(exclude_unset=True), "patch_size": size}
            )
        return self
