"""The register stage's choice: never a controller worse than a rule without saying so."""

from __future__ import annotations

import json

import pytest

from radar.controller.dataset import write_records
from radar.controller.synthetic import synthetic_records
from radar.controller.mdp import CostModel
from radar.controller.policy import LSTMController
from radar.controller.rules import fixed_depth_controller, threshold_controller
from radar.controller.simulate import controller_depths, tune_threshold
from radar.ops.train import split_records
from radar.demo.champion import choose_champion

COST = CostModel(T_0=1.0, T_f=0.25, T_eye=0.0, t_max=6, ar_step=1.0)  # decisions free: ties are exact


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("champion")
    records = synthetic_records(800, t_max=6, k=3, seed=11)
    write_records(records, root / "records.parquet")
    COST.save(root / "costs.json")
    return root, records


def candidate(root, name, controller) -> dict:
    return {"path": str(controller.save(root / name)), "run_id": None}


def choose(root, candidates, out="champion"):
    return choose_champion(str(root / "records.parquet"), str(root / "costs.json"), candidates, root / out,
                           root / f"{out}.json", eval_fraction=0.25, seed=0, track=False)


def test_when_every_controller_loses_to_a_rule_the_rule_is_registered_and_named(files):
    root, records = files
    bad = {"trained": candidate(root, "bad1", fixed_depth_controller(6, 3)),
           "tuned": candidate(root, "bad2", fixed_depth_controller(6, 3))}  # always the deepest: poor here
    out = choose(root, bad)
    assert out["rule"] is not None and out["champion_speedup"] > max(out["speedups"].values())
    champion = LSTMController.load(out["path"])
    assert LSTMController.read_meta(out["path"])["rule"] == out["rule"]
    if out["rule"].startswith("tree:"):  # the network decides as the rule it stands for
        assert (controller_depths(champion, records.states) == int(out["rule"].removeprefix("tree:"))).all()
    assert json.loads((root / "champion.json").read_text())["champion"] == out["rule"]


def test_a_controller_as_good_as_the_best_rule_stays_the_champion(files):
    root, _ = files
    _, fit, _ = split_records(str(root / "records.parquet"), 0.25, 0)
    tuned = threshold_controller(tune_threshold(fit, COST), 3)  # a controller deciding as the tuned rule does
    out = choose(root, {"trained": candidate(root, "good", tuned),
                        "tuned": candidate(root, "bad3", fixed_depth_controller(6, 3))}, out="champion2")
    assert out["rule"] is None and out["choice"] == "trained"
    assert out["speedups"]["trained"] >= max(out["rule_speedups"].values())


def test_a_champion_slower_than_ar_is_registered_as_not_drafting(files, tmp_path):
    root, _ = files
    slow = root / "slow-costs.json"
    CostModel(T_0=1.0, T_f=0.25, T_eye=0.0, t_max=6, ar_step=0.2).save(slow)  # a cycle costs >= 5 AR steps
    out = choose_champion(str(root / "records.parquet"), str(slow),
                          {"trained": candidate(root, "slow1", fixed_depth_controller(2, 3)),
                           "tuned": candidate(root, "slow2", fixed_depth_controller(3, 3))},
                          tmp_path / "champion", tmp_path / "sim.json", eval_fraction=0.25, seed=0, track=False)
    assert out["champion_speedup"] < 1 and out["drafts"] is False
    assert LSTMController.drafts_at(out["path"]) is False


def test_a_champion_faster_than_ar_drafts(files):
    root, _ = files
    out = choose(root, {"trained": candidate(root, "fast1", fixed_depth_controller(2, 3)),
                        "tuned": candidate(root, "fast2", fixed_depth_controller(3, 3))}, out="champion3")
    assert out["champion_speedup"] > 1 and LSTMController.drafts_at(out["path"]) is True
