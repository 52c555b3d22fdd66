"""MLflow conventions: one experiment per command, SQLite in the working directory unless told otherwise."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite file in the working directory (MLflow 3 refuses the file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def flatten(d: dict) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, the shape MLflow params and metrics take."""
    out: dict[str, Any] = {}
    _flat("", d, out)
    return out


@contextmanager
def run(experiment: str, run_name: str | None = None, params: dict | None = None) -> Iterator[Any]:
    """Start an MLflow run in `experiment` with flattened `params`; yields the mlflow module for logging."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as active:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield active


def log_metrics(metrics: dict) -> None:
    """Log the numeric leaves of a (nested) dict as metrics."""
    import mlflow

    numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics({k.replace(":", "_"): v for k, v in numeric.items()})


def log_json(obj: dict, name: str) -> None:
    """Store a JSON artifact in the active run."""
    import mlflow

    mlflow.log_dict(obj, name)


def log_file(path: str | Path) -> None:
    import mlflow

    mlflow.log_artifact(str(path))
