"""Loading a job: safe YAML (no repeated keys, YAML 1.2 numbers) validated against the schema, with
messages that name the file, every bad key path, the keys allowed there and the nearest one."""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.base import NAME_PATTERN, ConfigError
from pipeline.config.job import PipelineConfig
from pipeline.config.model import _model_family

ModelT = TypeVar("ModelT", bound=BaseModel)


class _JobLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the last would silently win) and
    reads `1e-3` as the number it is in YAML 1.2 (YAML 1.1 wants a dot: `1.0e-3`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _JobLoader.construct_mapping)
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
_JobLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely; an unreadable or undecodable file, a syntax error or a repeated key
    names the file (and the line)."""
    path = Path(path)
    try:
        stream = io.StringIO(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a text file (byte {error.start} is not UTF-8); a job config is YAML text"
        ) from None
    stream.name = str(path)  # what the loader's messages call the file
    try:
        return yaml.load(stream, Loader=_JobLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_config(path: str | Path, model: type[ModelT] = PipelineConfig) -> ModelT:  # type: ignore[assignment]
    """Load and validate a YAML config file against `model`."""
    return validate(load_yaml(path), model, source=str(path))


def check_name(name: str, source: str) -> str:
    """A name given on the command line (a run's, a target's): it becomes a folder, so it follows the
    same rule as a job file's names (no `/`, no `..`)."""
    if not re.fullmatch(NAME_PATTERN, name) or len(name) > 100:
        rule = "up to 100 letters, digits, '_', '.', '-', starting with a letter or digit"
        raise ConfigError(f"{source}: {name!r} is not a name ({rule})")
    return name


def validate(data: Any, model: type[ModelT], source: str, key_style: str = "yaml") -> ModelT:
    """Validate a mapping against `model`; on failure raise ConfigError naming `source` and each key.

    key_style "cli" writes top-level keys as command-line options (`--per-class`).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        lines = [_describe(item, data, model, key_style) for item in _root_causes(error.errors())]
        noun = "error" if len(lines) == 1 else "errors"
        raise ConfigError(f"{source}: {len(lines)} config {noun}:\n" + "\n".join(lines)) from None


def _root_causes(items: list[Any]) -> list[Any]:
    """The errors without those that only follow from another: a list 'too short after validation'
    because its items were refused (`sizes: [-5]` is one error, the -5, not also an empty list)."""
    refused = {tuple(item["loc"][:-1]) for item in items if item["loc"] and isinstance(item["loc"][-1], int)}
    return [item for item in items if not (item["type"] == "too_short" and tuple(item["loc"]) in refused)]


def _describe(item: dict[str, Any], data: Any, model: type[BaseModel], key_style: str) -> str:
    keys = _user_key_path(item["loc"], data)
    path = _format_path(keys, key_style)
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, keys[:-1], data)
        close = difflib.get_close_matches(str(keys[-1]), allowed, n=1)
        hint = f"; did you mean {_format_path([close[0]], key_style)!r}?" if close else ""
        return f"  {path}: unknown key{hint}"
    if item["type"] == "missing":
        return f"  {path}: required key is missing"
    if item["type"] == "too_short":  # pydantic says "... after validation", which reads as a second fault
        least, length = item.get("ctx", {}).get("min_length"), item.get("ctx", {}).get("actual_length")
        return f"  {path}: needs at least {least} {'value' if least == 1 else 'values'}, got {length}"
    got = item.get("input")
    shown = "" if isinstance(got, dict | list) or not keys else f" (got {got!r})"
    return f"  {path or '(top level)'}: {message}{shown}{_quoted_value_hint(item['type'], got)}"


def _quoted_value_hint(error_type: str, got: Any) -> str:
    """Files that vitpipe once read leniently (`lr: "3e-3"`, `use_gpu: "yes"`) are told what to write."""
    if not isinstance(got, str):
        return ""
    if error_type in ("float_type", "int_type"):
        with contextlib.suppress(ValueError):
            float(got)
            return "; write the number without quotes"
    if error_type == "bool_type" and got.lower() in ("yes", "no", "true", "false", "on", "off"):
        return "; write true or false, without quotes"
    return ""


def _user_key_path(loc: tuple[Any, ...], data: Any) -> list[Any]:
    """The error's location as the user wrote it: drop the discriminator tags pydantic inserts."""
    keys: list[Any] = []
    node = data
    for part in loc:
        inside_dict = isinstance(node, dict) and part in node
        inside_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if inside_dict or inside_list:
            node = node[part]  # type: ignore[index]
        elif isinstance(node, dict) and part in (node.get("kind"), _model_family(node)):
            continue  # the tagged-union branch, not a key of the file
        else:
            node = None
        keys.append(part)
    return keys


def _format_path(keys: list[Any], key_style: str) -> str:
    text = ""
    for key in keys:
        if isinstance(key, int):
            text += f"[{key}]"
        elif key_style == "cli" and not text:
            text = "--" + str(key).replace("_", "-")
        else:
            text += ("." if text else "") + str(key)
    return text


def _allowed_keys(model: type[BaseModel], parent: list[Any], data: Any) -> list[str]:
    """Field names of the section at `parent`, for a did-you-mean hint."""
    annotation: Any = model
    node = data
    for part in parent:
        node = node.get(part) if isinstance(node, dict) else None
        annotation = _resolve(_child_annotation(annotation, part), node)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return list(annotation.model_fields) if is_model else []


def _child_annotation(annotation: Any, part: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict:
        return args[1]
    return args[0] if args else None


def _unannotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _resolve(annotation: Any, node: Any) -> Any:
    """Unwrap Annotated and Optional; pick a tagged-union branch by the node's `kind` (or `family`)."""
    annotation = _unannotated(annotation)
    members = [_unannotated(a) for a in typing.get_args(annotation)]
    branches = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
    if not branches or typing.get_origin(annotation) in (dict, list, tuple):
        return annotation
    node = node if isinstance(node, dict) else {}
    tags = {"kind": node.get("kind"), "family": _model_family(node)}
    chosen = [
        branch
        for branch in branches
        for tag, value in tags.items()
        if tag in branch.model_fields and typing.get_args(branch.model_fields[tag].annotation) == (value,)
    ]
    return (chosen or branches)[0]
