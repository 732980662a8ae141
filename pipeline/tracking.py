"""Experiment tracking (a job's `tracking:` section): MLflow and/or Weights & Biases.

One tracking run per vitpipe run, with a child per stage, per fine-tune task and per study point. MLflow
nests them (`mlflow.parentRunId`); W&B has no nesting, so each child that logs something is a W&B run
in the vitpipe run's group, its config the resolved job and the child's own settings (`step.`).
Children are found again by their key (`vitpipe.key` tag in MLflow, an id derived from the key in
W&B): a relaunched run continues the same tracking runs. Parameters are the resolved config, flattened
(`pretrain.optimizer.lr`); metrics are every logged step of rank 0 (and of each fine-tune task);
artifacts are the pictures, reports and exported config.

Tracking never fails training: an unreachable server or a refused call is one warning, and that
tracker is off for the rest of the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.console import say

KEY_TAG = "vitpipe.key"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value
PARAMS_PER_CALL = 100  # MLflow's limit per log_batch
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


# A step record's fields that are not its metrics: the step itself and the wall time it was written at
# (trackers keep their own).
NOT_METRICS = frozenset({"step", "time"})


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: settings as one level of dotted keys (lists stay whole)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class TrackingTarget:
    """Where one tracking run's records go; plain data, handed to Ray tasks and workers."""

    key: str = ""
    mlflow_uri: str | None = None
    mlflow_run: str | None = None
    wandb: dict[str, Any] | None = None  # wandb.init settings: project, mode, entity, group, dir, id, name

    @property
    def enabled(self) -> bool:
        return self.mlflow_run is not None or (self.wandb is not None and "id" in self.wandb)


OFF = TrackingTarget()
_failed: set[str] = set()  # trackers that failed in this process: off from then on


def _warn(tracker: str, doing: str, error: BaseException) -> None:
    if tracker not in _failed:
        _failed.add(tracker)
        say(
            f"vitpipe: warning: tracking ({tracker}) {doing} failed, so it is off from here: "
            f"{type(error).__name__}: {error}",
            err=True,
        )


# ---------------------------------------------------------------- the vitpipe run's tracking run


def open_run(section: Any, root: str, name: str, params: dict[str, Any]) -> TrackingTarget:
    """The parent tracking run of the vitpipe run in `root` (found again on a relaunch), or OFF when the
    job tracks nothing or no tracker can be reached."""
    if section is None:
        return OFF
    target = TrackingTarget(key=root)
    if section.mlflow is not None:
        uri = absolute_uri(section.mlflow)
        target = _open_mlflow_parent(uri, section.experiment or name, root, name, params) or target
    if section.wandb is not None:
        group = f"{name}-{_short(root)}"
        directory = section.wandb.dir or str(Path(root) / "tracking")
        Path(directory).mkdir(parents=True, exist_ok=True)
        wandb = {
            "project": section.wandb.project,
            "mode": section.wandb.mode,
            "entity": section.wandb.entity,
            "group": group,
            "dir": directory,
            "config": flatten(params),
        }
        target = replace(target, wandb=wandb)
    return target


def absolute_uri(uri: str) -> str:
    """A tracking URI every process reads alike: a relative folder or sqlite file made absolute here (Ray
    workers run in other directories)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).absolute())
    if "://" in uri or ":" in uri.split("/", 1)[0] or uri.startswith("databricks"):
        return uri  # a server, a URI with its scheme, or MLflow's `databricks` profiles
    return str(Path(uri).expanduser().absolute())


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database (MLflow's default is
    `./mlruns` of whichever directory each process runs in); a server or a folder store decides itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def _open_mlflow_parent(
    uri: str, experiment: str, root: str, name: str, params: dict
) -> TrackingTarget | None:
    try:
        _check_reachable(uri)
        client = _mlflow_client(uri)
        found = client.get_experiment_by_name(experiment)
        if found:
            experiment_id = found.experiment_id
        else:
            experiment_id = client.create_experiment(experiment, artifact_location=_artifact_location(uri))
        run_id = _find_or_create(client, experiment_id, root, None, name, {"vitpipe.run_dir": root})
        _log_params(client, run_id, params)
    except Exception as error:
        _warn("mlflow", f"at {uri}: opening the run", error)
        return None
    return TrackingTarget(key=root, mlflow_uri=uri, mlflow_run=run_id)


def open_child(parent: TrackingTarget, key: str, name: str, params: dict[str, Any]) -> TrackingTarget:
    """A child of `parent` (a stage, a fine-tune task, a study point), the same one on a relaunch."""
    if parent is OFF or not (parent.mlflow_run or parent.wandb):
        return OFF
    full_key = f"{parent.key}/{key}"
    child = TrackingTarget(key=full_key, mlflow_uri=parent.mlflow_uri)
    if parent.mlflow_run is not None and "mlflow" not in _failed:
        try:
            client = _mlflow_client(parent.mlflow_uri)
            experiment_id = client.get_run(parent.mlflow_run).info.experiment_id
            run_id = _find_or_create(client, experiment_id, full_key, parent.mlflow_run, name, {})
            _log_params(client, run_id, params)
            child = replace(child, mlflow_run=run_id)
        except Exception as error:
            _warn("mlflow", f"opening {name}", error)
    if parent.wandb is not None and "wandb" not in _failed:
        prefix = parent.wandb.get("name")
        full_name = f"{prefix}/{name}" if prefix else name
        config = {**parent.wandb.get("config", {}), **flatten(params, "step.")}  # the job, then the child's
        wandb = {**parent.wandb, "id": _short(full_key), "name": full_name, "config": config}
        child = replace(child, wandb=wandb)
    return child


def log_artifacts(target: TrackingTarget, paths: list[str | Path]) -> None:
    """Files (pictures, reports, the exported config) attached to the tracking run; missing ones skipped."""
    files = [str(path) for path in paths if path and Path(path).is_file()]
    if not files or not target.enabled:
        return
    if target.mlflow_run is not None and "mlflow" not in _failed:
        try:
            client = _mlflow_client(target.mlflow_uri)
            for path in files:
                client.log_artifact(target.mlflow_run, path)
        except Exception as error:
            _warn("mlflow", "logging artifacts", error)
    if target.wandb is not None and "id" in target.wandb:
        with _wandb_run(target) as run:
            if run is not None:
                for path in files:
                    run.save(path, base_path=str(Path(path).parent), policy="now")


def end(target: TrackingTarget, status: str) -> None:
    """Mark the tracking run FINISHED, FAILED or KILLED (a relaunch sets it running again)."""
    if target.mlflow_run is not None and "mlflow" not in _failed:
        try:
            _mlflow_client(target.mlflow_uri).set_terminated(target.mlflow_run, status)
        except Exception as error:
            _warn("mlflow", "ending the run", error)


# ---------------------------------------------------------------- metrics, from wherever they are made


@dataclass
class StepLogger:
    """Every logged step's numbers into the target's tracking run (rank 0 and fine-tune tasks call it
    through pipeline.metrics.MetricsLog)."""

    target: TrackingTarget
    _wandb: Any = field(default=None, repr=False)
    _pending: list[Any] = field(default_factory=list, repr=False)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        numbers = {
            k: float(v)
            for k, v in record.items()
            if k not in NOT_METRICS and isinstance(v, int | float) and math.isfinite(v)
        }
        if not numbers:
            return
        if self.target.mlflow_run is not None and "mlflow" not in _failed:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self._pending += [Metric(key, value, stamp, step) for key, value in numbers.items()]
            if len(self._pending) >= 200:
                self.flush()
        if self.target.wandb is not None and "wandb" not in _failed:
            try:
                if self._wandb is None:
                    self._wandb = _wandb_init(self.target)
                self._wandb.log(numbers, step=step)
            except Exception as error:
                _warn("wandb", "logging metrics", error)

    def flush(self) -> None:
        """Send the metrics held back (MLflow takes them in batches)."""
        pending, self._pending = self._pending, []
        if pending and "mlflow" not in _failed:
            try:
                client = _mlflow_client(self.target.mlflow_uri)
                for start in range(0, len(pending), 1000):
                    client.log_batch(self.target.mlflow_run, metrics=pending[start : start + 1000])
            except Exception as error:
                _warn("mlflow", "logging metrics", error)

    def close(self) -> None:
        self.flush()
        if self._wandb is not None:
            with contextlib.suppress(Exception):
                self._wandb.finish()
            self._wandb = None


# ---------------------------------------------------------------- MLflow and W&B underneath


def _mlflow_client(uri: str | None) -> Any:
    for name, value in MLFLOW_ENV.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _check_reachable(uri: str) -> None:
    """An http(s) server that does not answer is known in seconds, not after MLflow's retries."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        from pipeline.ray_session import check_reachable

        check_reachable(f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}")


def _find_or_create(
    client: Any, experiment_id: str, key: str, parent: str | None, name: str, tags: dict[str, str]
) -> str:
    """The run tagged with `key` (set running again), else a new one."""
    quoted = key.replace("'", "\\'")
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{quoted}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {KEY_TAG: key, **tags, **({PARENT_TAG: parent} if parent else {})}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """The flattened settings as parameters; on a relaunch only new keys are logged (MLflow parameters
    cannot change) and a changed value is kept as a `vitpipe.changed.KEY` tag."""
    from mlflow.entities import Param, RunTag

    logged = client.get_run(run_id).data.params
    flat = {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(params).items()}
    new = [Param(key, value) for key, value in flat.items() if key not in logged]
    changed = [
        RunTag(f"vitpipe.changed.{key}", value)
        for key, value in flat.items()
        if key in logged and logged[key] != value
    ]
    for start in range(0, max(len(new), len(changed)), PARAMS_PER_CALL):
        client.log_batch(
            run_id, params=new[start : start + PARAMS_PER_CALL], tags=changed[start : start + PARAMS_PER_CALL]
        )


def _wandb_init(target: TrackingTarget) -> Any:
    import wandb

    settings = {key: value for key, value in (target.wandb or {}).items() if value is not None}
    return wandb.init(**settings, resume="allow", reinit="create_new")


@contextlib.contextmanager
def _wandb_run(target: TrackingTarget) -> Any:
    """The target's W&B run opened for a moment (resumed: the same id), or None if W&B failed."""
    if "wandb" in _failed:
        yield None
        return
    try:
        run = _wandb_init(target)
    except Exception as error:
        _warn("wandb", "opening a run", error)
        yield None
        return
    try:
        yield run
    finally:
        with contextlib.suppress(Exception):
            run.finish()


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
