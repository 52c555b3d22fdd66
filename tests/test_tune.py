"""`radar tune`: a small Ray Tune sweep on synthetic records, its MLflow runs and registered champion, resume with
Tuner.restore, and the one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from radar.controller.dataset import read_records, train_test_split, write_records
from radar.controller.synthetic import synthetic_records
from radar.controller.mdp import CostModel
from radar.controller.policy import load_controller
from radar.controller.simulate import controller_depths, evaluate_depths, simulate
from radar.common import tracking
from radar.ops.models import download_controller
from radar.cli.app import app
from radar.cluster.tune import grid_space, param_space, scaled_cost, trial_configs

runner = CliRunner()
COSTS = {"T_0": 0.01, "T_f": 0.002, "T_eye": 0.0002, "t_max": 4}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Records, a cost file, and MLflow (SQLite + artifacts) in a temporary working directory."""
    root = tmp_path_factory.mktemp("tune")
    write_records(synthetic_records(240, t_max=4, k=4, seed=0), root / "records")
    (root / "costs.json").write_text(json.dumps(COSTS))
    (root / "empty").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("RADAR_HOME", str(root / "home"))
        mp.chdir(root)
        yield root


def tune_args(root, *extra: str) -> list[str]:
    # One trial at a time in one reused worker: on a 2-core machine, parallel workers each importing torch cost
    # more than they save on trials this small.
    return ["tune", "--data", str(root / "records"), "--costs", str(root / "costs.json"), "--space", "demo",
            "--epochs", "3", "--batch-size", "32", "--storage", str(root / "store"), "--cpus-per-trial", "0.5",
            "--max-concurrent", "1", *extra]


def _trial_progress(root) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sorted((root / "store" / "radar-tune").glob("trial_*/progress.csv"))}


def test_sweep_reports_registers_the_best_and_resumes_without_rerunning(ray_session, workdir):
    result = runner.invoke(app, tune_args(workdir, "--num-samples", "3", "--search", "optuna"))
    assert result.exit_code == 0, result.output
    assert "best trial" in result.stdout and "registered models:/radar-controller" in result.stdout

    # Every trial ran and reported the held-out speedup; the fixed-depth reference every trial reports is priced
    # with the true costs (the scaled costs each trial trains with would give other numbers).
    progress = _trial_progress(workdir)
    assert len(progress) == 3 and all("eval_speedup" in text for text in progress.values())
    fit, held = train_test_split(read_records(workdir / "records"), 0.2, seed=0)
    true_cost = CostModel.from_dict(COSTS)
    best_fixed = simulate(held, true_cost).best_fixed.speedup
    assert f"{best_fixed:.3f}" in result.stdout

    # The champion loads back by alias, and its registered speedup is its true-cost speedup on the held-out set.
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    champion = client.get_model_version_by_alias("radar-controller", "champion")
    controller = load_controller(download_controller("models:/radar-controller@champion"))
    res = evaluate_depths(held, controller_depths(controller, held.states), true_cost, "controller", controller=True)
    assert float(champion.tags["eval_speedup"]) == pytest.approx(res.speedup, rel=1e-6)
    # ... and it was logged to its own trial's MLflow run, one run per trial in experiment radar-tune.
    exp = client.get_experiment_by_name("radar-tune")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and champion.run_id in {r.info.run_id for r in runs}
    assert all("eval_speedup" in r.data.metrics for r in runs)

    # A new sweep under the same name is refused and leaves the results alone.
    again = runner.invoke(app, tune_args(workdir, "--num-samples", "3"))
    assert again.exit_code == 2 and "--resume" in again.stderr
    assert _trial_progress(workdir) == progress

    # Resuming a finished sweep restores it (Tuner.restore) and reruns nothing.
    resumed = runner.invoke(app, tune_args(workdir, "--num-samples", "3", "--resume", "--no-register"))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed the sweep" in resumed.stderr and "best trial" in resumed.stdout
    assert _trial_progress(workdir) == progress
    assert len(client.search_runs([exp.experiment_id])) == 3


def test_unknown_search_algorithm_is_a_one_line_error(workdir):
    result = runner.invoke(app, tune_args(workdir, "--num-samples", "2", "--search", "hyperband", "--name", "bad"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "hyperband" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (workdir / "store" / "bad").exists()


def test_data_dir_without_records_is_a_one_line_error(workdir):
    args = tune_args(workdir, "--num-samples", "2", "--name", "empty")
    args[args.index("--data") + 1] = str(workdir / "empty")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "no records" in result.stderr
    assert not (workdir / "store" / "empty").exists()


def test_cost_scales_change_only_the_training_reward():
    config = {"cost": {**COSTS, "ar_step": None, "meta": {}}, "alpha": 0.01, "gamma": 0.99, "lr": 1e-3, "epochs": 2,
              "batch_size": 8, "variant": "improved", "seed": 0, "hidden_size": 16, "dropout": 0.1,
              "t0_scale": 2.0, "tf_scale": 0.5, "teye_scale": 1.0}
    cfg, ctrl, true_cost = trial_configs(config, k=4)
    assert (cfg.cost.T_0, cfg.cost.T_f, cfg.cost.T_eye) == pytest.approx((0.02, 0.001, 0.0002))
    assert true_cost == CostModel.from_dict(COSTS)
    assert ctrl.hidden_size == ctrl.mlp_hidden == 16 and ctrl.input_size == 4
    assert scaled_cost(true_cost).T_0 == true_cost.T_0


def test_param_space_holds_the_fixed_settings_and_a_grid():
    space = param_space("/data", COSTS, epochs=5, space="demo", search="grid", seed=7, grid_seeds=2)
    assert space["data"] == "/data" and space["epochs"] == 5 and space["split_seed"] == 7
    assert space["alpha"] == grid_space("demo")["alpha"]
    assert space["seed"] == {"grid_search": [7, 8]}  # repeats of a grid differ by training seed, not by split
    assert set(param_space("/data", COSTS, 5)) >= {"alpha", "gamma", "lr", "hidden_size", "dropout", "variant",
                                                    "t0_scale", "tf_scale", "teye_scale"}
    with pytest.raises(ValueError, match="unknown search space"):
        param_space("/data", COSTS, 5, space="huge")
