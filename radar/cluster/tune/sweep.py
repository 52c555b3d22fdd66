"""Run a sweep: build (or restore) the Tuner with the chosen search algorithm and ASHA, fit it, summarise the trials
and find the best trial's checkpoint (radar.ops.sweep registers it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from radar.cluster.tune.space import METRIC, MODE, SEARCHES, SPACES, param_space
from radar.cluster.tune.trainable import train_controller_trial
from radar.common import tracking

TUNER_STATE = "tuner.pkl"  # what Tune writes into an experiment directory it can restore


@dataclass
class SweepConfig:
    data: str
    num_samples: int = 20
    search: str = "optuna"
    space: str = "full"
    costs: str = "llama3.1-8b"
    epochs: int = 100
    batch_size: int = 64
    report_every: int = 1
    eval_fraction: float = 0.2
    seed: int = 0
    storage: str = "runs/tune"
    name: str = "radar-tune"
    resume: bool = False
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0  # 0 = as many as the CPUs allow
    track: bool = True
    verbose: int = 1  # Tune's own progress output: 0 silent, 1 status updates, 2 every result

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(f"unknown search algorithm {self.search!r}; choose one of {', '.join(SEARCHES)}")
        if self.space not in SPACES:
            raise ValueError(f"unknown search space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.num_samples < 1 or self.epochs < 1 or self.report_every < 1:
            raise ValueError("num_samples, epochs and report_every must be >= 1")
        if self.cpus_per_trial <= 0:
            raise ValueError("cpus_per_trial must be > 0")

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage).expanduser().resolve() / self.name


def _trial_dirname(trial) -> str:
    # Short names: the default packs every parameter into the directory name.
    return f"trial_{trial.trial_id}"


def _trainable(cfg: SweepConfig):
    from ray import tune

    return tune.with_resources(train_controller_trial, {"cpu": cfg.cpus_per_trial})


def check_inputs(cfg: SweepConfig) -> dict:
    """Read the records and the cost file once in the driver, so bad inputs fail before Ray starts or anything is
    written; returns the true cost model as a dict."""
    from radar.controller.dataset import read_records, train_test_split
    from radar.controller.mdp import CostModel

    records = read_records(cfg.data)
    train_test_split(records, cfg.eval_fraction, seed=cfg.seed)  # both sides non-empty
    cost = CostModel.resolve(cfg.costs)
    if cost.t_max != records.t_max:
        raise ValueError(f"records have t_max={records.t_max} but the cost model {cfg.costs} has t_max={cost.t_max}")
    return cost.to_dict()


def build_tuner(cfg: SweepConfig):
    """(Tuner, restored): `Tuner.restore` when `cfg.resume` and the experiment exists, else a new Tuner (refused when
    an experiment of that name already exists, so earlier results are never overwritten)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    exp_dir = cfg.experiment_dir
    if cfg.resume and tune.Tuner.can_restore(str(exp_dir)):
        check_inputs(cfg)  # a resumed sweep reads the records again: fail early if they are gone
        # The search algorithm, scheduler, space and callbacks come back from the experiment's own state.
        return tune.Tuner.restore(str(exp_dir), trainable=_trainable(cfg), resume_errored=True), True
    if (exp_dir / TUNER_STATE).exists():
        raise ValueError(f"a sweep named {cfg.name!r} already exists in {exp_dir.parent}: pass --resume to continue "
                         "it, or another --name")
    cost = check_inputs(cfg)
    grid = cfg.search == "grid"
    space = param_space(str(Path(cfg.data).resolve()), cost, cfg.epochs, cfg.space, cfg.search, cfg.batch_size,
                        cfg.eval_fraction, cfg.seed, cfg.report_every, grid_seeds=cfg.num_samples if grid else 1)
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.seed)
    else:  # random sampling and the grid both expand the space with the basic variant generator
        search_alg = BasicVariantGenerator(random_state=cfg.seed)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=max(cfg.report_every, cfg.epochs // 10),
                              reduction_factor=3)
    callbacks = []
    if cfg.track:
        from radar.cluster.tune.mlflow_logger import MLflowTrialLogger

        callbacks.append(MLflowTrialLogger(tracking.TUNE_EXPERIMENT, tags={"sweep": cfg.name}))
    tuner = tune.Tuner(
        _trainable(cfg),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=scheduler,
            num_samples=1 if grid else cfg.num_samples,  # a grid's repeats are its seeds (param_space)
            max_concurrent_trials=cfg.max_concurrent or None,
            reuse_actors=True,  # one worker process runs trial after trial: torch is imported once, not per trial
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(exp_dir.parent), callbacks=callbacks, verbose=cfg.verbose,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order=MODE),
        ),
    )
    return tuner, False


def run_sweep(cfg: SweepConfig):
    """Fit the sweep (new or resumed) and return (ResultGrid, restored)."""
    import os

    # Checkpoints are a few KB and snapshots take milliseconds here; Tune's "snapshotting may become a bottleneck"
    # warning (forced by num_to_keep) would only be noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tuner, restored = build_tuner(cfg)
    return tuner.fit(), restored


PARAM_COLUMNS = ("alpha", "gamma", "lr", "hidden_size", "dropout", "variant", "t0_scale", "tf_scale", "teye_scale")


def trial_rows(results) -> list[dict]:
    """One summary dict per trial: id, status, the searched parameters, epochs run, best and last metric."""
    rows = []
    for r in results:
        history = r.metrics_dataframe
        has = history is not None and METRIC in getattr(history, "columns", ())
        rows.append({
            "trial": (r.metrics or {}).get("trial_id") or Path(r.path).name,
            "status": "error" if r.error else "ok",
            **{k: (r.config or {}).get(k) for k in PARAM_COLUMNS},
            "epochs": int(history["epoch"].max()) if has else 0,
            "best": float(history[METRIC].max()) if has else None,
            "last": float(history[METRIC].iloc[-1]) if has else None,
            "best_fixed": (r.metrics or {}).get("best_fixed_speedup"),
        })
    return rows


def unfinished(cfg: SweepConfig, results, restored: bool) -> int:
    """Trials the sweep still owes after `fit` returned: not zero only when it was interrupted (Ctrl-C), and then
    `--resume` continues it."""
    from ray.tune import ExperimentAnalysis

    # The ResultGrid marks interrupted trials TERMINATED once their actors stop; the state Tune saved just before
    # (the one a resume reads) still says RUNNING or PENDING.
    saved = ExperimentAnalysis(str(cfg.experiment_dir)).trials
    open_trials = sum(t.status not in ("TERMINATED", "ERROR") for t in saved)
    # Trials the search algorithm had not created yet (a fresh random or Optuna sweep makes num_samples).
    missing = 0 if restored or cfg.search == "grid" else max(0, cfg.num_samples - len(results))
    return open_trials + missing


def best_result(results):
    """The trial with the highest `eval_speedup` reported at any epoch."""
    reported = [r for r in results if r.metrics_dataframe is not None and METRIC in r.metrics_dataframe.columns]
    if not reported:
        raise ValueError(f"no trial reported {METRIC} yet; {results.num_errors} of {len(results)} trials errored "
                         f"(see {results.experiment_path})")
    return results.get_best_result(METRIC, MODE, scope="all")


def best_checkpoint(results) -> tuple[object, dict, str]:
    """(checkpoint, its reported metrics, trial id) of the best trial's best checkpoint."""
    best = best_result(results)
    ckpt = best.get_best_checkpoint(METRIC, MODE) or best.checkpoint
    if ckpt is None:
        raise ValueError(f"the best trial ({best.path}) left no checkpoint")
    metrics = next((m for c, m in best.best_checkpoints if c.path == ckpt.path), best.metrics)
    return ckpt, metrics, str(best.metrics.get("trial_id", ""))
