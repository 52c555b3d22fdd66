"""`radar calibrate`: the simulator's price of each method against a live run on the same prompts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from radar.cli.app import app
from radar.controller.collect import collect_records
from radar.controller.dataset import write_records
from radar.controller.profile import profile_costs
from radar.controller.rules import fixed_depth_controller
from radar.common.prompts import load_prompts
from radar.decoding.pair import ModelPair
from radar.decoding.tree import TreeConfig
from radar.ops.bench import BenchConfig
from radar.ops.calibrate import CalibrateConfig, calibrate, table

TEXTS = ["What is the capital of France?", "def add(a, b):", "Why is the sky blue?"]
TREE = TreeConfig(branching=2, max_calls=3, total_tokens=4)


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    """Prompts, records of them (T=0), a cost file and a rule controller, all for the tiny pair."""
    root = tmp_path_factory.mktemp("calibrate")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}) + "\n" for i, t in enumerate(TEXTS)))
    pair = ModelPair.load(*tiny_pair, device="cpu", dtype="float32", tree=TREE)
    records = collect_records(pair, load_prompts(prompts), t_max=3, k=2, total_tokens=4, max_new_tokens=12,
                              progress=False)
    write_records(records, root / "records.parquet")
    profile_costs(pair, t_max=3, k=2, total_tokens=4, prompt_tokens=16, repeats=2, out=root / "costs.json")
    fixed_depth_controller(2, 2).save(root / "rule")
    return root


def run(setup, tiny_pair, methods, **kw):
    return calibrate(CalibrateConfig(records=str(setup / "records.parquet"), costs=str(setup / "costs.json"),
                                     bench=live_run(setup, tiny_pair, methods, controller=str(setup / "rule")), **kw))


def live_run(setup, tiny_pair, methods, **kw) -> BenchConfig:
    return BenchConfig(**{**dict(prompts=str(setup / "prompts.jsonl"), limit=None, methods=methods,
                                 max_new_tokens=12, model=str(tiny_pair[0]), draft=str(tiny_pair[1]), device="cpu",
                                 dtype="float32"), **kw})


def test_every_method_gets_a_prediction_a_live_figure_and_the_error_split(setup, tiny_pair):
    result = run(setup, tiny_pair, ["tree:2", "tree:3@2", "threshold:0.5", "radar"], out=str(setup / "cal.json"))
    assert set(result["methods"]) == {"tree:2", "tree:3@2", "threshold:0.5", "radar"}
    for name, row in result["methods"].items():
        pred, got = row["predicted"], row["live"]
        assert pred["tokens_per_s"] > 0 and got["tokens_per_s"] > 0 and got["cycles"] > 0
        assert row["error"] == pytest.approx(pred["tokens_per_s"] / got["tokens_per_s"] - 1)
        assert row["residual_ms_per_cycle"] == pytest.approx(got["ms_per_cycle"] - got["priced_ms_per_cycle"])
        assert row["speedup_error"] == pytest.approx(
            (pred["tokens_per_s"] / result["predicted_ar_tokens_per_s"])
            / (got["tokens_per_s"] / result["ar_decode_tokens_per_s"]) - 1)
    # the rule network makes two calls a cycle, as tree:2, so the records give both the same tokens per cycle
    assert result["methods"]["radar"]["predicted"]["tokens_per_cycle"] == pytest.approx(
        result["methods"]["tree:2"]["predicted"]["tokens_per_cycle"])
    assert json.loads((setup / "cal.json").read_text())["methods"].keys() == result["methods"].keys()
    assert "tree:3@2" in table(result)


def test_prompts_the_records_never_saw_are_a_clear_error(setup, tiny_pair, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "z9", "prompt": "Hello"}) + "\n")
    with pytest.raises(ValueError, match="none of the .* prompts is in"):
        calibrate(CalibrateConfig(records=str(setup / "records.parquet"), costs=str(setup / "costs.json"),
                                  bench=live_run(setup, tiny_pair, ["tree:2"], prompts=str(other))))


def test_a_method_the_records_cannot_price_is_a_clear_error(setup, tiny_pair):
    with pytest.raises(ValueError, match="cannot be priced from tree records"):
        run(setup, tiny_pair, ["chain:2"])


def test_the_command_prints_the_table(setup, tiny_pair):
    res = CliRunner().invoke(app, ["calibrate", "--data", str(setup / "records.parquet"), "--costs",
                                   str(setup / "costs.json"), "--prompts", str(setup / "prompts.jsonl"),
                                   "--methods", "tree:2", "--max-new-tokens", "8", "--model", str(tiny_pair[0]),
                                   "--draft", str(tiny_pair[1]), "--device", "cpu", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert "tree:2" in res.output and "live tok/s" in res.output


def test_costs_can_be_measured_in_the_same_run(setup, tiny_pair):
    result = calibrate(CalibrateConfig(records=str(setup / "records.parquet"), costs="measure",
                                       bench=live_run(setup, tiny_pair, ["tree:2"], max_new_tokens=8),
                                       profile_repeats=2))
    assert result["cost"]["verify_tokens"] and result["cost"]["T_f"] > 0
    assert result["methods"]["tree:2"]["live"]["cycles"] > 0


@pytest.mark.parametrize("method,match", [("tree:9", "at most 3 draft calls"), ("tree:2@8", "up to 4 tree tokens")])
def test_methods_beyond_the_records_are_refused_before_decoding(setup, tiny_pair, method, match):
    with pytest.raises(ValueError, match=match):
        run(setup, tiny_pair, [method])
