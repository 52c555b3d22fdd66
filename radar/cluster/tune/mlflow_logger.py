"""One MLflow run per Tune trial, logged from the driver.

Ray's MLflowLoggerCallback writes every key of every result (config included) as its own request, one SQLite
transaction each, which on a long sweep serialises the driver. This logger writes each result as one batch, and
only the numeric results, with the trial's config as params."""

from __future__ import annotations

import time

from ray.tune import Callback

from radar.common.tracking import flatten, tracking_uri

# Bookkeeping keys Tune adds to every result that say nothing about the controller.
SKIP_METRICS = {"timestamp", "pid", "done", "iterations_since_restore", "time_since_restore", "time_this_iter_s"}


class MLflowTrialLogger(Callback):
    """Tune callback: a run per trial in `experiment` (tag trial_name = str(trial), as Ray's own logger sets it),
    params from the trial config, metrics per result at step = the result's `epoch`."""

    def __init__(self, experiment: str, tags: dict[str, str] | None = None, uri: str | None = None):
        self.experiment = experiment
        self.tags = dict(tags or {})
        self.uri = uri or tracking_uri()  # fixed here, so a resumed sweep logs to the same store
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment; the client and the run map are rebuilt after restore.
        return {**self.__dict__, "_client": None, "_experiment_id": None, "_runs": {}}

    def _setup_client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp else self._client.create_experiment(self.experiment)
        return self._client

    def setup(self, **info) -> None:
        self._setup_client()

    def _run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        from mlflow.entities import Param

        client = self._setup_client()
        # A trial restarted by a resumed sweep keeps its run.
        found = client.search_runs([self._experiment_id], f"tags.trial_name = '{trial}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(self._experiment_id, run_name=str(trial),
                                    tags={**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id})
            run_id = run.info.run_id
            params = [Param(k, str(v)[:500]) for k, v in flatten(dict(trial.config)).items()]
            client.log_batch(run_id, params=params)
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        from mlflow.entities import Metric

        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k not in SKIP_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._setup_client().log_batch(self._run_id(trial), metrics=metrics)

    def _end(self, trial, status: str) -> None:
        self._setup_client().set_terminated(self._run_id(trial), status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FAILED")
