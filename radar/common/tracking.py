"""MLflow conventions: one experiment per command, SQLite in the working directory unless told otherwise."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from radar.common.paths import cache_dir

DEFAULT_URI = "sqlite:///mlflow.db"
# One experiment per command that logs.
BENCH_EXPERIMENT, TRAIN_EXPERIMENT, TUNE_EXPERIMENT = "radar-bench", "radar-train", "radar-tune"
TRAIN_DRAFT_EXPERIMENT = "radar-train-draft"


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
    """Start an MLflow run in `experiment` with flattened `params`; yields the active run."""
    import mlflow

    # Failing to open the store or reach the server is the user's to fix: one line, not a traceback.
    with registry_errors(f"MLflow experiment {experiment}"):
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment(experiment)
        active = mlflow.start_run(run_name=run_name)
    with active:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield active


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """Log the numeric leaves of a (nested) dict as metrics (at `step`, e.g. the epoch, when given)."""
    import mlflow

    numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        # MLflow names allow alphanumerics, _ - . space : /; method names carry ":" and "@" (tree:3@6 -> tree_3_6)
        mlflow.log_metrics({re.sub(r"[^\w\-. /]", "_", k): v for k, v in numeric.items()}, step=step)


def log_json(obj: dict, name: str) -> None:
    """Store a JSON artifact in the active run."""
    import mlflow

    mlflow.log_dict(obj, name)


def log_file(path: str | Path) -> None:
    """Store one file as an artifact of the active run."""
    import mlflow

    mlflow.log_artifact(str(path))


def log_dir(path: str | Path, artifact_path: str | None = None) -> None:
    """Store a directory's files as artifacts of the active run (under `artifact_path`)."""
    import mlflow

    mlflow.log_artifacts(str(path), artifact_path)


# ---- the model registry -----------------------------------------------------------------------------------

REGISTERED_MODEL = "radar-controller"
CHAMPION = "champion"
CONTROLLER_ARTIFACT = "controller"  # artifact folder of a run that holds a controller directory
REGISTRY_EXPERIMENT = "radar-registry"  # where a controller registered without a run of its own gets one


@contextmanager
def registry_errors(what: str) -> Iterator[None]:
    """Turn MLflow, database and connection failures into a one-line ValueError naming `what` and the server."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        text = str(exc.message or exc).strip()
        if "API request to" in text and ("Max retries exceeded" in text or "Failed to establish" in text):
            # The REST client's message is a paragraph of urllib3 internals; the cause is the one thing to keep.
            cause = re.search(r"\[Errno -?\d+\][^\"')]*", text)
            reason = f" ({cause.group(0).strip()})" if cause else ""
            raise ValueError(f"{what}: cannot reach the MLflow tracking server at {tracking_uri()}{reason}") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"{what}: {first} (tracking URI {tracking_uri()})") from None
    except Exception as exc:  # requests' and SQLAlchemy's errors, without importing either just to name them
        module = type(exc).__module__
        if module.startswith(("requests", "urllib3")):
            raise ValueError(f"{what}: cannot reach the MLflow tracking server at {tracking_uri()}: {exc}") from None
        if module.startswith("sqlalchemy"):
            line = str(exc).strip().splitlines()[0]
            raise ValueError(f"{what}: cannot open the MLflow store at {tracking_uri()}: {line}") from None
        raise


def _client():
    """A client of the tracking store (the fluent API pointed at it too)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient(tracking_uri())


def check_model_dir(path: Path, required: tuple[str, ...], what: str) -> None:
    """FileNotFoundError unless `path` holds every file of `required` (a saved model of kind `what`)."""
    if not all((path / f).is_file() for f in required):
        raise FileNotFoundError(f"{path} is not a saved {what} directory (needs {' and '.join(required)})")


def register_model_dir(
    model_dir: str | Path,
    run_id: str | None,
    name: str,
    alias: str | None,
    metrics: dict | None = None,
    experiment: str = REGISTRY_EXPERIMENT,
    artifact: str = CONTROLLER_ARTIFACT,
    description: str = "",
) -> int:
    """Log `model_dir` as artifact `artifact` of run `run_id` (a new run in `experiment` when None), register it as
    a new version of model `name`, point `alias` at it, and return the version number. `metrics` go on the
    model version as tags (and on the run when it is a new one)."""
    path = Path(model_dir)
    metrics = {k: v for k, v in flatten(metrics or {}).items() if isinstance(v, (int, float, str))}
    with registry_errors(f"registering {path} as {name}"):
        from mlflow.exceptions import MlflowException

        client = _client()
        new_run = run_id is None
        if new_run:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            run_id = client.create_run(exp_id, run_name=f"register-{name}").info.run_id
        client.log_artifacts(run_id, str(path), artifact)
        if new_run:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    client.log_metric(run_id, k, float(v))
            client.set_terminated(run_id)
        # The artifact's own URI, not runs:/..., because MLflow 3 resolves runs:/ sources only for logged models.
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact}"
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source, run_id=run_id,
                                              tags={k: str(v) for k, v in metrics.items()})
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """'models:/name@alias' -> (name, alias, None); 'models:/name/3' -> (name, None, 3)."""
    rest = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if rest:
        if "@" in rest and "/" not in rest:
            name, alias = rest.split("@", 1)
            if name and alias:
                return name, alias, None
        parts = rest.split("/")
        if len(parts) == 2 and parts[0] and parts[1].isdigit():
            return parts[0], None, int(parts[1])
    raise ValueError(f"{uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION")


def registry_cache() -> Path:
    """Where downloaded registry models are kept (`cache_dir("registry")`)."""
    return cache_dir("registry")


def download_model_dir(uri: str, required: tuple[str, ...], what: str) -> Path:
    """A local directory for registry URI `uri` (models:/name@alias or models:/name/version), downloaded once per
    model version and kept in `registry_cache()`; refused unless it holds the `required` files of a `what`."""
    import hashlib
    import shutil
    import tempfile

    name, alias, number = parse_model_uri(uri)
    with registry_errors(uri):
        import mlflow

        client = _client()
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, str(number))
        # A version's source never changes, but version numbers repeat across tracking servers: key on both.
        key = hashlib.sha256(f"{tracking_uri()}|{name}|{version.version}|{version.source}".encode()).hexdigest()[:16]
        dest = registry_cache() / f"{name}-v{version.version}-{key}"
        if all((dest / f).is_file() for f in required):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
        try:
            # By version, not by alias again: the alias may move while we download.
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                             dst_path=str(tmp)))
            if not all((local / f).is_file() for f in required):
                raise ValueError(f"{uri}: version {version.version} of {name} is not a {what} "
                                 f"(no {' and '.join(required)} in {version.source})")
            try:
                local.rename(dest)  # atomic: a concurrent reader sees no half-written directory
            except OSError:
                if not all((dest / f).is_file() for f in required):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_run(experiment: str, tags: dict[str, str]) -> str | None:
    """The id of a run of `experiment` carrying every tag of `tags`, if there is one."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], where, max_results=1)
    return runs[0].info.run_id if runs else None
