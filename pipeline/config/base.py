"""What every config section is built from: strict number types, the frozen `Section` base, `vit`
dataclasses as sections, and the stable digest that cache keys and fingerprints use."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Annotated, Any, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    create_model,
    model_validator,
)

from vit.recipe import Crop, Optimizer, Schedule

# Strict numbers: YAML already types its scalars (the loader reads `1e-3` as a number, as YAML 1.2
# does), so `true`, "10" or "3e-3" where a number belongs is a mistake; so are .inf and .nan.
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
# Sane upper bounds where a typo (an extra digit, 1e26) would plan a run that never ends.
MAX_STEPS = 1_000_000_000
StepBudget = Annotated[int, Strict(), Field(gt=0, le=MAX_STEPS)]
BatchSize = Annotated[int, Strict(), Field(gt=0, le=2**24)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
UnitFraction = Annotated[Float, Field(ge=0, lt=1)]


def _worker_count(value: Any) -> int | tuple[int, int]:
    """A positive number of workers, or [min, max] with 1 <= min <= max: one error either way."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and value >= 1:
        return value
    pair = isinstance(value, list | tuple) and len(value) == 2
    if (
        pair
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1]
    ):
        return (value[0], value[1])
    shown = list(value) if isinstance(value, tuple) else value
    raise ValueError(
        f"must be a number of workers (1 or more) or [min, max] with 1 <= min <= max (got {shown!r})"
    )


# Ray Train workers: a number, or [min, max] for an elastic run.
WorkerCount = Annotated[
    int | tuple[int, int],
    PlainValidator(_worker_count),
    PlainSerializer(lambda workers: list(workers) if isinstance(workers, tuple) else workers),
]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]
Extension = Annotated[str, Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")]  # a tar member's suffix, lower case

PIL_DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_RUNS = "runs"  # where runs go unless a job says otherwise (run_dir, storage_path)
DEFAULT_PATCH_SIZE = 16  # `vitpipe preprocess` without --patch-size (in a job: the model's)


class ConfigError(ValueError):
    """A config that does not validate; the message names the source file and every bad key path."""


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value: config hashes, cache keys, fingerprints."""
    payload = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and a validated config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self, exclude: set[str] | None = None) -> str:
        """A stable hash of the settings (less `exclude`), for caching and for refusing to mix outputs."""
        return digest(self.model_dump(mode="json", exclude=exclude))


def _strict(annotation: Any) -> Any:
    """The strict config type of a dataclass field's type: numbers and flags must be what YAML typed."""
    if annotation is float:
        return Float
    if annotation is bool:
        return Flag
    if annotation is int:
        return Annotated[annotation, Strict()]
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return tuple[tuple(_strict(argument) for argument in arguments)]  # type: ignore[misc]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return Union[tuple(_strict(argument) for argument in arguments)]  # noqa: UP007
    return annotation


def dataclass_section(cls: type) -> Any:
    """A config section for a `vit` dataclass, which declares the fields and defaults (once, there).

    A YAML mapping is checked key by key (unknown keys, strict types, each error at its key path), then
    becomes an instance of `cls`, whose own checks run; the validated config holds that instance.
    """
    hints = typing.get_type_hints(cls)
    fields = {field.name: (_strict(hints[field.name]), field.default) for field in dataclasses.fields(cls)}

    def checked(section: BaseModel) -> BaseModel:
        cls(**dict(section))  # the dataclass's own range checks, reported at the section's key
        return section

    model = create_model(
        cls.__name__,
        __base__=Section,
        __doc__=cls.__doc__,
        __validators__={"checked": model_validator(mode="after")(checked)},
        **fields,
    )
    return Annotated[
        model,
        BeforeValidator(lambda value: dataclasses.asdict(value) if isinstance(value, cls) else value),
        AfterValidator(lambda section: cls(**dict(section))),
        PlainSerializer(dataclasses.asdict),
    ]


OptimizerSection = dataclass_section(Optimizer)
ScheduleSection = dataclass_section(Schedule)
CropSection = dataclass_section(Crop)
