"""The `radar tune` operation: a Ray Tune sweep of the controller's hyperparameters and its outcome."""

from __future__ import annotations

from dataclasses import dataclass

from radar.cluster.tune.space import METRIC
from radar.cluster.tune.sweep import PARAM_COLUMNS, SweepConfig, best_result, run_sweep, trial_rows, unfinished


@dataclass
class SweepOutcome:
    results: object  # Ray Tune's ResultGrid
    restored: bool  # the sweep was resumed from its saved state
    unfinished: int  # trials an interruption left unfinished (nothing is chosen or registered then)
    rows: list[dict]  # one summary row per trial
    best_trial: str | None = None
    best_speedup: float | None = None
    best_params: dict | None = None


def sweep(cfg: SweepConfig) -> SweepOutcome:
    """Run (or resume) the sweep and summarise it; the best trial is named only when every trial finished."""
    results, restored = run_sweep(cfg)
    outcome = SweepOutcome(results, restored, unfinished(cfg, results, restored), trial_rows(results))
    if outcome.unfinished:
        return outcome
    best = best_result(results)
    outcome.best_trial = str(best.metrics.get("trial_id"))
    outcome.best_speedup = float(best.metrics_dataframe[METRIC].max())
    outcome.best_params = {k: best.config.get(k) for k in PARAM_COLUMNS}
    return outcome
