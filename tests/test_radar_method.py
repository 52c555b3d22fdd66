"""Method `radar`: the learned stop policy drives the dynamic tree and decoding stays lossless."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from radar.controller.policy import DRAFTS_KEY, ControllerConfig, LSTMController
from radar.controller.rules import threshold_controller
from radar.decoding.methods import Method
from radar.decoding.pair import ModelPair
from radar.decoding.verify import Sampling
from radar.cli.app import app
from radar.ops.models import attach_controller
from tiny_models import random_ids

runner = CliRunner()


@pytest.fixture(scope="module")
def mixed_controller(tmp_path_factory):
    """A controller that continues with probability 1/2 at every decision, so sampled depths vary from cycle to
    cycle (a stronger losslessness check than any fixed depth)."""
    torch.manual_seed(3)
    controller = LSTMController(ControllerConfig(input_size=2, hidden_size=16, mlp_hidden=16))
    with torch.no_grad():
        controller.mlp[3].weight.zero_()
        controller.mlp[3].bias.zero_()
    path = tmp_path_factory.mktemp("ctrl") / "controller"
    controller.save(path)
    return path


@pytest.fixture(scope="module")
def radar_pair(tiny_pair, mixed_controller):
    target, draft = tiny_pair
    pair = ModelPair.load(target, draft, device="cpu", dtype="float32")
    return attach_controller(pair, mixed_controller, greedy=False)


def test_method_parse_accepts_radar():
    assert Method.parse("radar") == Method("radar") and str(Method.parse(" radar ")) == "radar"


@pytest.mark.parametrize("prompt_len", [3, 17])
def test_greedy_radar_equals_ar_token_for_token(radar_pair, prompt_len):
    ids = random_ids(prompt_len, radar_pair.target.config.vocab_size, seed=prompt_len)[0].tolist()
    ar = radar_pair.generate(ids, "ar", Sampling(0.0), max_new_tokens=48)
    radar = radar_pair.generate(ids, "radar", Sampling(0.0), max_new_tokens=48)
    assert radar.token_ids == ar.token_ids
    assert len(set(radar.stats.draft_calls_per_cycle)) > 1, "the controller should pick different depths"
    assert max(radar.stats.draft_calls_per_cycle) <= radar_pair.tree.max_calls


def test_sampled_radar_is_reproducible_per_seed(radar_pair):
    ids = random_ids(9, radar_pair.target.config.vocab_size, seed=1)[0].tolist()
    a = radar_pair.generate(ids, "radar", Sampling(1.0), max_new_tokens=24, seed=5)
    b = radar_pair.generate(ids, "radar", Sampling(1.0), max_new_tokens=24, seed=5)
    assert a.token_ids == b.token_ids


def test_radar_without_a_controller_is_a_clear_error(tiny_pair):
    pair = ModelPair.load(*tiny_pair, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="needs a controller"):
        pair.generate([1, 5, 6], "radar", max_new_tokens=4)


def test_cli_generate_radar_matches_ar(tiny_pair, mixed_controller):
    target, draft = tiny_pair
    common = ["generate", "--model", str(target), "--draft", str(draft), "--prompt", "def add(a, b):",
              "--max-new-tokens", "20", "--json"]
    radar = runner.invoke(app, [*common, "--method", "radar", "--controller", str(mixed_controller)])
    ar = runner.invoke(app, [*common, "--method", "ar"])
    assert radar.exit_code == 0, radar.output
    assert json.loads(radar.stdout)["token_ids"] == json.loads(ar.stdout)["token_ids"]
    assert json.loads(radar.stdout)["method"] == "radar"


def test_cli_missing_controller_is_a_one_line_error(tiny_pair, tmp_path):
    target, draft = tiny_pair
    result = runner.invoke(app, ["generate", "--model", str(target), "--draft", str(draft), "--prompt", "x",
                                 "--method", "radar", "--controller", str(tmp_path / "nope")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error:") and "no such file" in result.stderr


def test_a_greedy_sampled_controller_pair_is_chosen_by_temperature(tiny_pair, tmp_path):
    def fixed_controller(path, keep_drafting: bool):
        controller = LSTMController(ControllerConfig(input_size=2, hidden_size=8, mlp_hidden=8))
        with torch.no_grad():
            controller.mlp[3].weight.zero_()
            controller.mlp[3].bias.copy_(torch.tensor([0.0, 5.0] if keep_drafting else [5.0, 0.0]))
        controller.save(path)

    fixed_controller(tmp_path / "pair" / "greedy", keep_drafting=True)
    fixed_controller(tmp_path / "pair" / "sampled", keep_drafting=False)
    pair = attach_controller(ModelPair.load(*tiny_pair, device="cpu", dtype="float32"), tmp_path / "pair")
    ids = random_ids(7, pair.target.config.vocab_size, seed=2)[0].tolist()
    greedy = pair.generate(ids, "radar", Sampling(0.0), max_new_tokens=16).stats.draft_calls_per_cycle
    sampled = pair.generate(ids, "radar", Sampling(1.0), max_new_tokens=16).stats.draft_calls_per_cycle
    assert set(greedy) == {pair.tree.max_calls} and set(sampled) == {1}


def test_a_controller_for_another_branching_is_refused_with_the_fix(tiny_pair, tmp_path):
    LSTMController(ControllerConfig(input_size=10, hidden_size=16, mlp_hidden=16)).save(tmp_path / "k10")
    pair = ModelPair.load(*tiny_pair, device="cpu", dtype="float32")  # the CPU tree: branching 2
    with pytest.raises(ValueError, match="branching-10 tree, but this pair drafts with branching 2"):
        attach_controller(pair, tmp_path / "k10")


def test_threshold_method_equals_ar_and_its_depth_follows_p(tiny_pair):
    pair = ModelPair.load(*tiny_pair, device="cpu", dtype="float32")
    prompt = random_ids(8, pair.target.config.vocab_size, seed=5)[0].tolist()
    ar = pair.generate(prompt, "ar", max_new_tokens=16).token_ids
    eager, cautious = (pair.generate(prompt, f"threshold:{p}", max_new_tokens=16) for p in (1e-6, 1.0))
    assert eager.token_ids == cautious.token_ids == ar
    assert cautious.stats.mean_draft_calls == 1  # P = 1: no frontier is that sure, so one call a cycle
    assert eager.stats.mean_draft_calls > 1


def test_a_budget_suffix_parses_and_round_trips():
    assert Method.parse("tree:3@6") == Method("tree", 3, budget=6) and str(Method.parse("tree:3@6")) == "tree:3@6"
    assert Method.parse("threshold:0.3@4") == Method("threshold", threshold=0.3, budget=4)
    for bad in ("chain:2@3", "radar@4", "ar@2", "tree:2@0", "tree:2@"):
        with pytest.raises(ValueError, match="tree:D@B"):
            Method.parse(bad)


def test_a_budgeted_tree_verifies_that_many_tokens_and_stays_lossless(tiny_pair):
    pair = ModelPair.load(*tiny_pair, device="cpu", dtype="float32")
    prompt = random_ids(8, pair.target.config.vocab_size, seed=6)[0].tolist()
    ar = pair.generate(prompt, "ar", max_new_tokens=16).token_ids
    for method, size in (("tree:3@1", 1), ("tree:3@5", 5), ("threshold:0.000001@2", 2)):
        res = pair.generate(prompt, method, max_new_tokens=16)
        assert res.token_ids == ar
        assert set(res.stats.tree_tokens_per_cycle) == {size}


def test_a_controller_with_a_budget_head_picks_each_cycles_tree_size_losslessly(tiny_pair, tmp_path):
    # A threshold network whose budget head picks 6 tokens when the best frontier score is above -5, else 1.
    controller = threshold_controller(0.02, 2, budgets=[1, 3, 6], budget=1)
    with torch.no_grad():
        controller.budget_head.weight[2, 2], controller.budget_head.bias[2] = 10.0, 60.0
    pair = attach_controller(ModelPair.load(*tiny_pair, device="cpu", dtype="float32"), controller.save(tmp_path / "c"))
    prompt = random_ids(8, pair.target.config.vocab_size, seed=7)[0].tolist()
    res = pair.generate(prompt, "radar", max_new_tokens=24)
    assert res.token_ids == pair.generate(prompt, "ar", max_new_tokens=24).token_ids
    assert set(res.stats.tree_tokens_per_cycle) <= {1, 2, 3, 6}  # a one-call pool holds only 2 nodes
    assert len(set(res.stats.tree_tokens_per_cycle)) > 1


def test_a_controller_whose_training_found_drafting_slower_decodes_with_the_target_alone(tiny_pair, mixed_controller,
                                                                                          tmp_path):
    slow = LSTMController.load(mixed_controller).save(tmp_path / "slow", meta={DRAFTS_KEY: False})
    pair = attach_controller(ModelPair.load(*tiny_pair, device="cpu", dtype="float32"), slow)
    prompt = random_ids(8, pair.target.config.vocab_size, seed=8)[0].tolist()
    res = pair.generate(prompt, "radar", max_new_tokens=16)
    assert res.token_ids == pair.generate(prompt, "ar", max_new_tokens=16).token_ids
    assert res.stats.draft_calls_per_cycle == [] and res.stats.target_calls == 16


def test_always_draft_overrides_a_controller_that_says_not_to(tiny_pair, mixed_controller, tmp_path):
    slow = LSTMController.load(mixed_controller).save(tmp_path / "slow", meta={DRAFTS_KEY: False})
    pair = attach_controller(ModelPair.load(*tiny_pair, device="cpu", dtype="float32"), slow, always_draft=True)
    prompt = random_ids(8, pair.target.config.vocab_size, seed=8)[0].tolist()
    assert pair.generate(prompt, "radar", max_new_tokens=16).stats.mean_draft_calls >= 1


def test_cli_generate_says_when_radar_did_not_draft(tiny_pair, mixed_controller, tmp_path):
    target, draft = tiny_pair
    slow = LSTMController.load(mixed_controller).save(tmp_path / "slow", meta={DRAFTS_KEY: False})
    result = runner.invoke(app, ["generate", "--model", str(target), "--draft", str(draft), "--prompt", "x",
                                 "--method", "radar", "--controller", str(slow), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "radar did not draft" in result.stderr


def _controller_with_margin(mixed_controller, tmp_path, speedup: float):
    return LSTMController.load(mixed_controller).save(
        tmp_path / f"margin-{speedup}", meta={DRAFTS_KEY: True, "simulated_speedup": speedup})


def test_a_controller_with_a_margin_within_the_simulators_error_is_measured_live(tiny_pair, mixed_controller,
                                                                                 tmp_path):
    close = _controller_with_margin(mixed_controller, tmp_path, 1.02)
    pair = attach_controller(ModelPair.load(*tiny_pair, device="cpu", dtype="float32"), close)
    prompt = random_ids(8, pair.target.config.vocab_size, seed=8)[0].tolist()
    ar = pair.generate(prompt, "ar", max_new_tokens=16).token_ids
    runs = [pair.generate(prompt, "radar", max_new_tokens=16) for _ in range(4)]
    assert [r.token_ids for r in runs] == [ar] * 4  # lossless under either arm
    assert [bool(r.stats.draft_calls_per_cycle) for r in runs] == [False, False, False, True]  # AR measured first


def test_a_controller_with_a_clear_margin_or_told_to_always_draft_is_not_gated(tiny_pair, mixed_controller, tmp_path):
    clear = _controller_with_margin(mixed_controller, tmp_path, 1.3)
    close = _controller_with_margin(mixed_controller, tmp_path, 1.02)
    load = lambda: ModelPair.load(*tiny_pair, device="cpu", dtype="float32")  # noqa: E731
    assert attach_controller(load(), clear).gate is None
    assert attach_controller(load(), close, always_draft=True).gate is None


def test_a_gated_radar_request_alone_in_a_batch_follows_the_gate(tiny_pair, mixed_controller, tmp_path):
    from radar.decoding.batching import Rendezvous

    close = _controller_with_margin(mixed_controller, tmp_path, 1.02)
    pair = attach_controller(ModelPair.load(*tiny_pair, device="cpu", dtype="float32"), close)
    prompt = random_ids(8, pair.target.config.vocab_size, seed=8)[0].tolist()
    rv = Rendezvous(pair.target)
    with rv.member():
        res = pair.batched(rv).generate(prompt, "radar", max_new_tokens=16)
    assert res.token_ids == pair.generate(prompt, "ar", max_new_tokens=16).token_ids
    assert res.stats.draft_calls_per_cycle == []  # the gate's first arm: the target alone
