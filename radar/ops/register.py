"""Champion registration: a controller directory, or a sweep's best trial, becomes a version of the registered
controller model with the alias `champion` (models:/radar-controller@champion)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from radar.common import tracking
from radar.common.files import new_dir
from radar.controller.policy import CONFIG_FILE, WEIGHTS_FILE

CONTROLLER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# A trial's metrics that go on the registered version as tags.
KEPT_METRICS = ("eval_speedup", "eval_calls", "best_fixed_speedup", "speedup_vs_best_fixed", "epoch")


def export_best_trial(results, dest: str | Path) -> tuple[dict, str]:
    """Copy the best trial's controller (only its own files, not Tune's) to `dest` atomically; returns (the
    checkpoint's metrics, the trial id)."""
    from radar.cluster.tune.sweep import best_checkpoint  # Ray Tune, only when there is a sweep

    ckpt, metrics, trial_id = best_checkpoint(results)
    with ckpt.as_directory() as d, new_dir(dest) as tmp:
        for f in CONTROLLER_FILES:
            shutil.copy2(Path(d) / f, tmp / f)
    return metrics, trial_id


def best_trial_run(trial_id: str) -> str | None:
    """The MLflow run of a sweep's trial (logged by the sweep's MLflow callback), if there is one."""
    if not trial_id:
        return None
    with tracking.registry_errors("looking up the best trial's MLflow run"):
        return tracking.find_run(tracking.TUNE_EXPERIMENT, {"trial_id": trial_id})


def register_best_trial(results, name: str | None = None, alias: str | None = None) -> tuple[int, dict]:
    """Register the best trial's best checkpoint as a version of the controller model with `alias` (champion by
    default), logged to that trial's MLflow run; returns (version, the checkpoint's metrics)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics, trial_id = export_best_trial(results, Path(tmp) / "controller")
        keep = {k: metrics[k] for k in KEPT_METRICS if k in metrics}
        version = register_controller(Path(tmp) / "controller", best_trial_run(trial_id),
                                      name=name or tracking.REGISTERED_MODEL, alias=alias or tracking.CHAMPION,
                                      metrics={**keep, "trial_id": trial_id}, experiment=tracking.TUNE_EXPERIMENT)
    return version, keep



def register_controller(
    controller_dir: str | Path,
    run_id: str | None = None,
    name: str = tracking.REGISTERED_MODEL,
    alias: str | None = tracking.CHAMPION,
    metrics: dict | None = None,
    experiment: str = tracking.REGISTRY_EXPERIMENT,
) -> int:
    """Register a saved controller directory as a new version of `name` with `alias` (the champion by default),
    logged to run `run_id` (a new run in `experiment` when None); returns the version number."""
    tracking.check_model_dir(Path(controller_dir), CONTROLLER_FILES, "controller")
    return tracking.register_model_dir(controller_dir, run_id, name, alias, metrics, experiment,
                                       tracking.CONTROLLER_ARTIFACT, "RADAR draft controller (LSTM stop policy)")


def champion_version() -> int | None:
    """The version models:/radar-controller@champion points at now (None when there is none or no store)."""
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking.tracking_uri())
        return int(client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION).version)
    except Exception:  # noqa: BLE001 - no such model or alias, or an unreadable store: register again
        return None
