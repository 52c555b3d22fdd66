"""`radar bench`: every method on the same prompts in one run; greedy outputs agree; JSON shape; MLflow run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from radar.cli.app import app

METHODS = ["ar", "hf", "hf-assisted", "chain:2", "tree:3"]


@pytest.fixture(scope="module")
def bench_result(tiny_pair, tmp_path_factory):
    target, draft = tiny_pair
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = CliRunner(env={"MLFLOW_TRACKING_URI": uri}).invoke(app, [
        "bench", "--model", str(target), "--draft", str(draft), "--prompts", "mt_bench", "--limit", "3",
        "--max-new-tokens", "16", "--repeats", "1", "--methods", ",".join(METHODS), "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), uri


def test_bench_json_has_every_method_with_the_documented_fields(bench_result):
    data, _ = bench_result
    assert set(data["methods"]) == set(METHODS)
    for r in data["methods"].values():
        assert {"tokens_per_s", "speedup_vs_ar", "tau", "draft_calls_per_cycle", "wall_s", "new_tokens", "outputs"} <= set(r)
        assert len(r["outputs"]) == 3
    assert data["methods"]["ar"]["speedup_vs_ar"] == 1.0
    assert data["config"]["prompt_count"] == 3


def test_greedy_outputs_of_every_method_equal_ar_and_hf_for_every_prompt(bench_result):
    data, _ = bench_result
    ar = data["methods"]["ar"]["outputs"]
    assert data["methods"]["hf"]["outputs"] == ar
    for method in METHODS:
        assert data["methods"][method]["outputs"] == ar, method


def test_speculative_methods_report_acceptance_and_draft_calls(bench_result):
    data, _ = bench_result
    assert data["methods"]["tree:3"]["draft_calls_per_cycle"] == 3
    assert data["methods"]["chain:2"]["draft_calls_per_cycle"] == 2
    assert data["methods"]["tree:3"]["tau"] >= 1.0


def test_ar_reports_its_decoding_steps_as_one_token_cycles_without_prefill(bench_result):
    data, _ = bench_result
    ar = data["methods"]["ar"]
    assert ar["cycles"]["committed"] == [1] * (ar["new_tokens"] - 3)  # every step after each prompt's first
    assert ar["cycle_tokens_per_s"] > ar["tokens_per_s"]  # the prefill is out


def test_bench_run_is_logged_to_mlflow_with_metrics_and_the_json(bench_result):
    import mlflow

    _, uri = bench_result
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("radar-bench")
    (run,) = client.search_runs([exp.experiment_id])
    assert "tree:3.tokens_per_s" not in run.data.metrics  # ':' is not a valid metric character
    assert any(k.startswith("tree_3.") for k in run.data.metrics)
    assert "bench.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_unknown_bench_method_is_a_one_line_error(tiny_pair):
    target, draft = tiny_pair
    result = CliRunner().invoke(app, ["bench", "--model", str(target), "--draft", str(draft), "--methods", "ar,fast", "--no-track"])
    assert result.exit_code == 2
    assert "unknown method 'fast'" in result.stderr


def test_bench_with_an_eagle3_head_runs_the_transformers_baselines_on_the_target_alone(tiny_pair, tmp_path):
    from tiny_models import make_tiny_eagle3

    from radar.decoding.model import Transformer

    target, _ = tiny_pair
    head_dir = tmp_path / "head"
    make_tiny_eagle3(Transformer.from_pretrained(target), draft_vocab=64).save_pretrained(head_dir)
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(target), "--draft", str(head_dir), "--prompts", "mt_bench", "--limit", "2",
        "--max-new-tokens", "8", "--methods", "ar,hf,hf-pld,tree:2", "--out", str(out), "--no-track",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["methods"]) == ["ar", "hf", "hf-pld", "tree:2"]
    assert all(data["greedy_outputs_match_ar"].values())
