"""The `radar train` operation: a controller trained on collected records, saved, and logged to MLflow."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from radar.common.files import new_files_in
from radar.controller.budgets import parse_budgets
from radar.controller.dataset import RecordSet, read_records, train_test_split
from radar.controller.mdp import CostModel
from radar.controller.policy import DRAFTS_KEY, ControllerConfig, LSTMController
from radar.controller.train import TrainConfig, evaluate_controller, train



@dataclass
class TrainJob:
    """What to train on and where the controller goes; `train` and `controller` are the algorithm's own configs
    (the controller's input size is set from the records)."""

    data: str
    out: str
    train: TrainConfig = field(default_factory=TrainConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    eval_fraction: float = 0.2  # share of prompts held out for the per-epoch simulated speedup
    track: bool = True
    run_name: str | None = None
    source: str | None = None  # who asked (e.g. "radar demo"), logged with the params
    budgets: str | None = None  # a budget head over these tree sizes: "auto" or "1,2,4"; None: depth only


@dataclass
class TrainOutcome:
    path: Path
    run_id: str | None
    eval_speedup: float | None
    n_train: int
    n_eval: int


def split_records(data: str | Path, eval_fraction: float, seed: int) -> tuple[RecordSet, RecordSet, RecordSet]:
    """(all, train, held-out) records of `data`, split by prompt."""
    records = read_records(data)
    fit, held = train_test_split(records, eval_fraction, seed=seed)
    return records, fit, held


def verdict_meta(speedup: float, cost: CostModel, basis: str = "held-out") -> dict:
    """Meta saying whether a controller simulated at `speedup` over AR on `basis` records should draft at all
    (`DRAFTS_KEY`). Without a measured AR step there is nothing to beat, and no verdict."""
    if cost.ar_step is None:
        return {}
    return {DRAFTS_KEY: speedup >= 1.0, "simulated_speedup": speedup, "verdict_records": basis}


def drafting_verdict(controller: LSTMController, records: RecordSet, cost: CostModel, basis: str = "held-out") -> dict:
    """`verdict_meta` of the controller's simulated speed on `records`, priced by the cost model it was trained
    with."""
    return verdict_meta(evaluate_controller(controller, records, cost).speedup, cost, basis)


def verdict(controller: LSTMController, fit: RecordSet, held: RecordSet, cost: CostModel) -> dict:
    """`drafting_verdict` on the held-out records, or on the training records when none are held out."""
    return drafting_verdict(controller, held, cost) if len(held) else drafting_verdict(controller, fit, cost, "training")


def train_controller(job: TrainJob, on_epoch: Callable[[dict], None] | None = None) -> TrainOutcome:
    """Train, save the controller's files into `job.out` (each replaced atomically, nothing else there touched), and
    log params, per-epoch metrics and the controller to MLflow."""
    from radar.common import tracking

    records, fit, held = split_records(job.data, job.eval_fraction, job.train.seed)
    budgets = parse_budgets(job.budgets, records.budget) or job.controller.budgets
    ctrl_cfg = ControllerConfig(**{**asdict(job.controller), "input_size": records.k, "budgets": budgets})
    params = {"train": job.train.to_dict(), "controller": asdict(ctrl_cfg), "records": str(job.data),
              "n_train": len(fit), "n_eval": len(held), **({"source": job.source} if job.source else {})}

    def epoch_done(metrics: dict, _model) -> None:
        if job.track:
            tracking.log_metrics(metrics, step=int(metrics["epoch"]))
        if on_epoch is not None:
            on_epoch(metrics)

    # The run opens before training, so an unreachable tracking server fails fast rather than after the epochs.
    logged = tracking.run(tracking.TRAIN_EXPERIMENT, run_name=job.run_name, params=params) if job.track else None
    with logged or nullcontext() as run:
        controller, history = train(fit, job.train, ctrl_cfg, on_epoch=epoch_done,
                                    eval_records=held if len(held) else None)
        with new_files_in(job.out) as tmp:
            controller.save(tmp, meta={"train": job.train.to_dict(), "records": str(job.data),
                                       "history": history.epochs[-1:],
                                       **verdict(controller, fit, held, job.train.cost)})
            if job.track:
                tracking.log_dir(tmp, tracking.CONTROLLER_ARTIFACT)
        run_id = run.info.run_id if job.track else None
    return TrainOutcome(Path(job.out), run_id, history.epochs[-1].get("eval_speedup"), len(fit), len(held))
