"""The one config schema of every stage (a module per stage's sections) and the loader every command
validates through; a config that fails here fails before any Ray work starts, with the file and the key
path named. Derived values (the recipe, the batch split, the worker group) belong to each stage's plan.
"""

from pipeline.config.base import DEFAULT_PATCH_SIZE, DEFAULT_RUNS, ConfigError, Section, digest
from pipeline.config.data import (
    IMAGE_EXTENSIONS,
    OUTPUT_NEUTRAL,
    ArrayDatasetConfig,
    DatasetConfig,
    DigitsConfig,
    FractalsConfig,
    ImageFolderConfig,
    MnistConfig,
    PreprocessConfig,
)
from pipeline.config.job import PipelineConfig, StudyConfig, TrackingConfig, WandbConfig
from pipeline.config.loader import check_name, load_config, load_yaml, validate
from pipeline.config.model import AnyModel, BiTModelConfig, ModelConfig
from pipeline.config.pretrain import (
    PRETRAIN_BUDGET,
    PRETRAIN_OPERATIONAL,
    PRETRAIN_OUTPUTS,
    PROBE_OPERATIONAL,
    PretrainConfig,
    pretrain_key,
)
from pipeline.config.transfer import FINETUNE_OPERATIONAL, AnalyzeConfig, EvaluateConfig, FinetuneConfig

__all__ = [
    "DEFAULT_PATCH_SIZE",
    "DEFAULT_RUNS",
    "FINETUNE_OPERATIONAL",
    "IMAGE_EXTENSIONS",
    "OUTPUT_NEUTRAL",
    "PRETRAIN_BUDGET",
    "PRETRAIN_OPERATIONAL",
    "PRETRAIN_OUTPUTS",
    "PROBE_OPERATIONAL",
    "AnalyzeConfig",
    "AnyModel",
    "ArrayDatasetConfig",
    "BiTModelConfig",
    "ConfigError",
    "DatasetConfig",
    "DigitsConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "FractalsConfig",
    "ImageFolderConfig",
    "MnistConfig",
    "ModelConfig",
    "PipelineConfig",
    "PreprocessConfig",
    "PretrainConfig",
    "Section",
    "StudyConfig",
    "TrackingConfig",
    "WandbConfig",
    "check_name",
    "digest",
    "load_config",
    "load_yaml",
    "pretrain_key",
    "validate",
]
