"""The Ray Tune function trainable: train one controller for one point of the search space and report its held-out
expected speedup (under the true costs) with a checkpoint of the controller, so ASHA can stop poor trials early."""

from __future__ import annotations

import tempfile
from dataclasses import replace

import torch

from radar.controller.dataset import read_records, train_test_split
from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerConfig, LSTMController
from radar.controller.simulate import controller_depths, evaluate_depths, simulate
from radar.controller.train import TrainConfig, train
from radar.cluster.tune.space import METRIC


def scaled_cost(cost: CostModel, t0_scale: float = 1.0, tf_scale: float = 1.0, teye_scale: float = 1.0) -> CostModel:
    """`cost` with T_0, T_f and T_eye multiplied by the given scales (the training reward's cost model)."""
    scales = {"t0_scale": t0_scale, "tf_scale": tf_scale, "teye_scale": teye_scale}
    return replace(cost, T_0=cost.T_0 * t0_scale, T_f=cost.T_f * tf_scale, T_eye=cost.T_eye * teye_scale,
                   verify_s=[v * t0_scale for v in cost.verify_s], meta={**cost.meta, "scaled": scales})


def trial_configs(config: dict, k: int) -> tuple[TrainConfig, ControllerConfig, CostModel]:
    """(training config with the scaled cost, controller config, true cost) for one trial's `config`. T_0's scale
    scales the whole verification curve."""
    true_cost = CostModel.from_dict(dict(config["cost"]), "tune config 'cost'")
    train_cost = scaled_cost(true_cost, config.get("t0_scale", 1.0), config.get("tf_scale", 1.0),
                             config.get("teye_scale", 1.0))
    cfg = TrainConfig(alpha=config["alpha"], gamma=config["gamma"], lr=config["lr"], epochs=config["epochs"],
                      batch_size=config["batch_size"], variant=config["variant"], seed=config["seed"], cost=train_cost)
    # One "hidden size" knob for both the LSTM and the head, as in the reference (128 and 128).
    hidden = int(config["hidden_size"])
    ctrl = ControllerConfig(input_size=k, hidden_size=hidden, mlp_hidden=hidden, dropout=config["dropout"])
    return cfg, ctrl, true_cost


def train_controller_trial(config: dict) -> None:
    """Ray Tune function trainable (see `radar.cluster.tune.space.param_space` for `config`): reports `eval_speedup`
    (held-out, greedy controller, true costs) every `report_every` epochs with a checkpoint of the controller."""
    from ray import tune

    torch.set_num_threads(1)  # trials get a CPU or a fraction of one: extra intra-op threads only contend
    records = read_records(config["data"])  # once per trial
    fit, held = train_test_split(records, config["eval_fraction"], seed=config["split_seed"])
    cfg, ctrl_cfg, true_cost = trial_configs(config, records.k)
    # Interrupted trials restart from scratch on resume: `train` has no warm start, and a trial is short.
    baseline = simulate(held, true_cost).best_fixed
    every, last = int(config["report_every"]), int(config["epochs"])

    def on_epoch(metrics: dict, controller: LSTMController) -> None:
        epoch = int(metrics["epoch"])
        if epoch % every and epoch != last:
            return
        res = evaluate_depths(held, controller_depths(controller, held.states), true_cost, "controller",
                              controller=True)
        report = {
            "epoch": epoch, METRIC: res.speedup, "eval_calls": res.mean_calls,
            "best_fixed_speedup": baseline.speedup, "speedup_vs_best_fixed": res.speedup / baseline.speedup,
            **{f"train_{k}": float(metrics[k]) for k in ("loss", "return", "calls", "entropy") if k in metrics},
        }
        meta = {"train": cfg.to_dict(), "true_cost": true_cost.to_dict(), "records": str(config["data"]),
                "tune": {k: v for k, v in config.items() if k not in ("cost", "data")}, "metrics": report}
        with tempfile.TemporaryDirectory() as tmp:
            controller.save(tmp, meta=meta)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))

    train(fit, cfg, ctrl_cfg, progress=False, on_epoch=on_epoch)
