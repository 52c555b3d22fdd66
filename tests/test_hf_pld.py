"""`hf-pld`: transformers' prompt-lookup decoding as a benchmark method, lossless and needing no draft model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from radar.cli.app import app
from radar.decoding.verify import Sampling
from radar.ops.hf import HFRunner

GREEDY = Sampling(0.0, 1.0)


@pytest.fixture(scope="module")
def runner(tiny_pair):
    target, _ = tiny_pair
    return HFRunner(str(target), None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def repetitive_prompt():
    # A random-init model loops on short cycles, and the prompt repeats itself: lookups find n-grams to copy.
    block = torch.randint(3, 320, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    return block * 4


def test_hf_pld_greedy_output_equals_hf_greedy_output(runner, repetitive_prompt):
    plain = runner("hf", repetitive_prompt, GREEDY, 48, seed=0)
    assert len(plain) == 48
    assert runner("hf-pld", repetitive_prompt, GREEDY, 48, seed=0) == plain


def test_hf_pld_verifies_copied_candidates_in_one_target_forward(runner, repetitive_prompt):
    lengths = []
    hook = runner.target.register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        runner("hf-pld", repetitive_prompt, GREEDY, 48, seed=0)
    finally:
        hook.remove()
    # Plain greedy feeds the prompt, then one token per forward; lookup adds the copied candidates to them.
    assert sum(lengths) - len(repetitive_prompt) > len(lengths)


def test_bench_runs_hf_pld_without_a_draft_and_reports_it(tiny_pair, tmp_path):
    target, _ = tiny_pair
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(target), "--prompts", "mt_bench", "--limit", "2", "--max-new-tokens", "8",
        "--repeats", "1", "--methods", "ar,hf-pld", "--out", str(out), "--no-track",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["methods"]) == {"ar", "hf-pld"}
    assert data["methods"]["hf-pld"]["new_tokens"] > 0
    assert data["greedy_outputs_match_ar"]["hf-pld"]
