"""The controller commands chained as a user runs them: profile -> collect -> train -> simulate."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from radar.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_profile_collect_train_simulate_chain_end_to_end(tiny_pair, tmp_path):
    target, draft = tiny_pair
    pair_args = ["--model", str(target), "--draft", str(draft)]
    invoke("profile", *pair_args, "--out", str(tmp_path / "costs.json"), "--t-max", "3", "--k", "4", "--repeats", "3")
    invoke("collect", *pair_args, "--prompts", "gsm8k", "--limit", "4", "--out", str(tmp_path / "records"),
           "--t-max", "3", "--k", "4", "--max-new-tokens", "12")
    invoke("train", "--data", str(tmp_path / "records"), "--out", str(tmp_path / "ctrl"),
           "--costs", str(tmp_path / "costs.json"), "--epochs", "2", "--hidden-size", "16")
    result = invoke("simulate", "--data", str(tmp_path / "records"), "--costs", str(tmp_path / "costs.json"),
                    "--controller", str(tmp_path / "ctrl"), "--out", str(tmp_path / "sim.json"),
                    "--plot", str(tmp_path / "sim.png"))
    table = json.loads((tmp_path / "sim.json").read_text())
    assert "controller" in json.dumps(table) and "oracle" in result.stdout
    assert (tmp_path / "sim.png").stat().st_size > 1000


def test_train_on_a_directory_without_records_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:")


def test_train_into_a_directory_holding_other_files_replaces_only_the_controller(tmp_path):
    from radar.controller.dataset import write_records
    from radar.controller.synthetic import synthetic_records

    write_records(synthetic_records(40, t_max=8, k=4, seed=0), tmp_path / "records" / "r.parquet")
    out = tmp_path / "runs"
    (out / "demo").mkdir(parents=True)
    (out / "demo" / "keep.txt").write_text("mine")
    invoke("train", "--data", str(tmp_path / "records"), "--out", str(out), "--epochs", "1", "--hidden-size", "8",
           "--no-track")
    assert (out / "demo" / "keep.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir()} == {"demo", "controller.json", "model.safetensors"}


def test_train_marks_a_controller_that_cannot_beat_the_target_alone_as_not_drafting(tmp_path):
    from radar.controller.dataset import write_records
    from radar.controller.mdp import CostModel
    from radar.controller.policy import DRAFTS_KEY, LSTMController
    from radar.controller.synthetic import synthetic_records

    write_records(synthetic_records(80, t_max=4, k=4, seed=0), tmp_path / "records" / "r.parquet")
    for name, ar_step in (("pays", 0.05), ("loses", 0.001)):  # a cycle costs >= 0.02 s: 20x a cheap AR token
        CostModel(T_0=0.02, T_f=0.002, T_eye=0.0001, t_max=4, ar_step=ar_step).save(tmp_path / f"{name}.json")
        invoke("train", "--data", str(tmp_path / "records"), "--out", str(tmp_path / name), "--epochs", "1",
               "--hidden-size", "8", "--costs", str(tmp_path / f"{name}.json"), "--no-track")
    meta = {name: LSTMController.read_meta(tmp_path / name) for name in ("pays", "loses")}
    assert meta["pays"][DRAFTS_KEY] is True and meta["pays"]["simulated_speedup"] > 1
    assert meta["loses"][DRAFTS_KEY] is False and meta["loses"]["simulated_speedup"] < 1
