"""Dataset collection (radar.controller.collect) and cost profiling (radar.controller.profile) on tiny models.

The pair is the session's `tiny_pair`, conditioned: the target's final norm is scaled by 6 (a temperature of 1/6
baked in, as in test_generate), so its next-token distributions are peaked enough for deep trees to be accepted,
and the draft is a noisier copy of it (0.1 std of every parameter), so acceptance lengths vary from cycle to
cycle. Unconditioned, the random target is nearly uniform and no tree deeper than 2 is ever accepted, which would
make every d_i with i >= 2 identical and the checks below vacuous.

The sanity checks compare the records with real decoding by the engine (`pair.generate(ids, "tree:i")`):

* per prefix, exactly: at temperature 0, d_i is one-hot at the number of drafts the engine accepts in its first
  cycle when it decodes that prefix with depth i; at temperature 1, d_i is the law of that number (chi-square on
  repeated seeded decodes of one prefix);
* in aggregate: the mean over records of E[l + 1 | d_i] against the mean tau of decoding the same prompts at fixed
  depth i. These are not the same average even in exact arithmetic: records sit at the cycle starts of the
  depth-t_max walk, while depth-i decoding starts its cycles elsewhere (it accepts fewer tokens per cycle, so it
  puts more cycles into hard stretches). At temperature 0 both follow the same greedy text, so at i = t_max the
  prefixes coincide and the means agree to float precision; for i < t_max only the placement of cycle starts
  differs, measured here at <= 2.5% (tolerance PLACEMENT_TOL = 6%). At temperature 1, decoding seeded like the
  collection walks the very same texts at i = t_max (tested), leaving only the acceptance draw given each
  prefix, whose variance d_t_max gives exactly (4-sigma z-test); for i < t_max the texts differ and cycles of one
  text are strongly correlated, so the test is 4 text-clustered standard errors plus the placement allowance.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare

from radar.controller.budgets import budget_dists
from radar.controller.collect import collect_prompt, collect_records, model_names, prompt_seed
from radar.controller.dataset import SCHEMA_VERSION, RecordSet, read_records, write_records
from radar.controller.mdp import CostModel
from radar.controller.state import frontier_state
from radar.controller.profile import monotone, profile_costs
from radar.decoding.model import Transformer
from radar.decoding.pair import ModelPair
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import TreeConfig
from radar.decoding.verify import Sampling
from radar.common.prompts import Prompt

from tiny_tokenizer import add_tokenizer

T_MAX, K = 8, 10
N_NEW = 32
TEXTS = [
    "What is the capital of France?",
    "def add(a, b):",
    "The quick brown fox",
    "for i in range(10):",
    "Why is the sky blue?",
    "How do I sort a list?",
]
PROMPTS = [Prompt(id=f"p{i}", text=t, source="test") for i, t in enumerate(TEXTS)]
PLACEMENT_TOL = 0.06  # relative: where cycles start differs between the records and depth-i decoding


@pytest.fixture(scope="module")
def pair(tiny_pair, tmp_path_factory):
    target_src, _ = tiny_pair
    root = tmp_path_factory.mktemp("collect_pair")
    target_dir = root / "target"
    shutil.copytree(target_src, target_dir)
    weights = target_dir / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] *= 6.0
    save_file(state, weights, metadata={"format": "pt"})
    draft = Transformer.from_pretrained(target_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
    draft.save_pretrained(root / "draft")
    add_tokenizer(root / "draft")
    # Live decoding must grow the same tree that collection records (branching K), whatever the device default.
    return ModelPair.load(target_dir, root / "draft", device="cpu", tree=TreeConfig(branching=K, max_calls=T_MAX, total_tokens=16))


def collect(pair, temperature, prompts=PROMPTS, **kw):
    return collect_records(pair, prompts, t_max=T_MAX, k=K, temperature=temperature, max_new_tokens=N_NEW,
                           progress=False, **kw)


@pytest.fixture(scope="module")
def greedy(pair):
    return collect(pair, 0.0)


@pytest.fixture(scope="module")
def sampled(pair):
    return collect(pair, 1.0)


def dists(records) -> np.ndarray:
    return np.stack([r.dists for r in records]).astype(np.float64)


def expected_tau(records) -> np.ndarray:
    """E[l + 1 | d_i] per record and depth: (N, t_max)."""
    return (dists(records) * np.arange(T_MAX + 1)).sum(-1) + 1


def real_taus(pair, depth, sampling=Sampling(), seeds=(0,)) -> list[int]:
    out = []
    for p in PROMPTS:
        for seed in seeds:
            res = pair.generate(pair.chat_ids(p.text), f"tree:{depth}", sampling, max_new_tokens=N_NEW, seed=seed)
            out += res.stats.accept_lengths
    return out


def first_cycle_accepted(pair, prefix, depth, sampling=Sampling(), seed=0) -> int:
    """Drafts the engine accepts in its first cycle on `prefix` at fixed depth (bonus excluded)."""
    res = pair.generate(prefix, f"tree:{depth}", sampling, max_new_tokens=1, seed=seed)
    return res.stats.accept_lengths[0] - 1


# ---- the records' shape and laws ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["greedy", "sampled"])
def test_every_d_i_sums_to_one_with_no_mass_beyond_i(which, request):
    d = dists(request.getfixturevalue(which))
    assert d.shape[1:] == (T_MAX, T_MAX + 1)
    np.testing.assert_allclose(d.sum(-1), 1.0, atol=1e-5)
    assert (d >= 0).all()
    beyond = np.arange(T_MAX + 1)[None, :] > np.arange(1, T_MAX + 1)[:, None]  # l > i
    assert (d[:, beyond] == 0).all()


def test_greedy_d_i_are_one_hot(greedy):
    d = dists(greedy)
    assert ((d == 0) | (d == 1)).all()
    assert (d.sum(-1) == 1).all()


def test_the_pair_is_not_degenerate(greedy, sampled):
    """Acceptance lengths vary across records and grow with depth, so the other checks have teeth."""
    for records in (greedy, sampled):
        tau = expected_tau(records)
        assert tau[:, -1].mean() > tau[:, 0].mean() + 0.5
        assert tau[:, -1].std() > 0.3
    assert dists(greedy)[:, -1, 4:].sum() > 0  # some greedy cycles accept 4 or more drafts at depth 8


def test_states_have_shape_t_max_by_k_and_are_sorted_descending(greedy, sampled):
    for records in (greedy, sampled):
        for r in records:
            assert r.states.shape == (T_MAX, K) and r.states.dtype == np.float32
            assert (np.diff(r.states, axis=1) <= 0).all()
            assert np.isfinite(r.states).all()
        # Deeper frontiers hold longer paths: their best cumulative log-prob is lower.
        best = np.stack([r.states[:, 0] for r in records])
        assert (np.diff(best, axis=1) <= 1e-5).all()


def test_states_are_what_the_live_controller_sees(pair, greedy):
    """s_1..s_{t_max-1} of the first record equal the frontiers the engine shows a stop policy in its first
    cycle on the same prompt; the policy never sees s_{t_max}."""

    class Recorder(FixedDepth):
        def __init__(self):
            super().__init__(T_MAX)
            self.seen = []

        def decide(self, calls, frontier_scores):
            self.seen.append(frontier_state(frontier_scores, K).numpy())
            return super().decide(calls, frontier_scores)

    rec = Recorder()
    pair.generate(pair.chat_ids(PROMPTS[0].text), f"tree:{T_MAX}", max_new_tokens=1, policy=rec)
    first = next(r for r in greedy if r.prompt_id == PROMPTS[0].id)
    np.testing.assert_allclose(np.stack(rec.seen), first.states[: T_MAX - 1], rtol=0, atol=1e-5)


def test_metadata_positions_follow_the_committed_tokens(pair, greedy):
    for p in PROMPTS:
        recs = [r for r in greedy if r.prompt_id == p.id]
        n_prompt = len(pair.chat_ids(p.text))
        assert recs[0].position == n_prompt - 1  # the root of the first cycle is the prompt's last token
        positions = [r.position for r in recs]
        # Each cycle commits its accepted drafts (at depth t_max, greedy: the one-hot's index) plus the bonus.
        steps = [int(np.argmax(r.dists[-1])) + 1 for r in recs[:-1]]
        assert np.diff(positions).tolist() == steps
        assert positions[-1] < n_prompt - 1 + N_NEW
    r = greedy[0]
    assert (r.temperature, r.schema_version) == (0.0, SCHEMA_VERSION)
    assert r.target and r.draft and r.target != r.draft
    assert [p.id for p in PROMPTS] == list(dict.fromkeys(r.prompt_id for r in greedy))  # prompt order kept


def test_names_can_be_given_and_on_record_sees_every_record(pair):
    seen = []
    recs = collect(pair, 0.0, prompts=PROMPTS[:1], target_name="tgt", draft_name="drf", on_record=seen.append)
    assert seen == recs
    assert {(r.target, r.draft) for r in recs} == {("tgt", "drf")}


def test_model_names_default_to_the_target_directory_and_draft(pair):
    target, draft = model_names(pair)
    assert Path(target).name == "target" and draft == "draft"
    assert model_names(pair, "tgt", "drf") == ("tgt", "drf")


def test_the_collected_text_is_the_targets_own(pair):
    """Commits are lossless: at temperature 0 the walk reproduces plain greedy decoding."""
    for p in PROMPTS[:3]:
        ids = pair.chat_ids(p.text)
        _, tokens = collect_prompt(pair, p, t_max=T_MAX, k=K, max_new_tokens=N_NEW)
        assert tokens == pair.generate(ids, "ar", max_new_tokens=N_NEW).token_ids


# ---- determinism and storage -----------------------------------------------------------------------------


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.states, y.states)
        np.testing.assert_array_equal(x.dists, y.dists)
        assert (x.prompt_id, x.position, x.target, x.draft, x.temperature) == (
            y.prompt_id, y.position, y.target, y.draft, y.temperature)


def test_the_same_seed_gives_identical_records_in_any_prompt_order(pair, sampled):
    again = collect(pair, 1.0, prompts=PROMPTS[:2][::-1])
    first = [r for r in sampled if r.prompt_id in {PROMPTS[0].id, PROMPTS[1].id}]
    assert_same(sorted(again, key=lambda r: (r.prompt_id, r.position)), first)
    other = collect(pair, 1.0, prompts=PROMPTS[:1], seed=1)
    assert [r.position for r in other] != [r.position for r in first if r.prompt_id == PROMPTS[0].id]
    assert prompt_seed(0, "a") != prompt_seed(0, "b") and prompt_seed(0, "a") == prompt_seed(0, "a")


def test_records_round_trip_through_parquet(tmp_path, sampled):
    path = write_records(sampled, tmp_path / "shards")
    back = read_records(tmp_path / "shards").to_records()
    assert path.suffix == ".parquet"
    assert_same(back, sampled)
    rs = RecordSet.from_records(sampled)
    assert rs.t_max == T_MAX and rs.k == K


def test_collect_needs_a_draft(pair):
    no_draft = ModelPair(pair.target, None, pair.tokenizer, pair.tree)
    with pytest.raises(ValueError, match="draft"):
        collect(no_draft, 0.0, prompts=PROMPTS[:1])


# ---- the sanity check: records against real decoding -----------------------------------------------------


def test_greedy_d_i_is_exactly_what_the_engine_accepts_from_that_prefix(pair):
    """Per prefix: the one-hot of d_i sits at the number of drafts depth-i decoding accepts from that prefix."""
    for p in PROMPTS[:2]:
        ids = pair.chat_ids(p.text)
        records, tokens = collect_prompt(pair, p, t_max=T_MAX, k=K, max_new_tokens=N_NEW)
        text = ids + tokens
        for r in records[:4]:
            prefix = text[: r.position + 1]
            got = [first_cycle_accepted(pair, prefix, i) for i in range(1, T_MAX + 1)]
            assert got == np.argmax(r.dists, axis=1).tolist(), (p.id, r.position)


def test_sampled_d_i_is_the_law_of_what_the_engine_accepts_from_that_prefix(pair):
    """At temperature 1 a record's d_i is the distribution of the engine's first-cycle acceptance on its prefix."""
    p = PROMPTS[0]
    records, tokens = collect_prompt(pair, p, t_max=T_MAX, k=K, temperature=1.0, max_new_tokens=12)
    text = pair.chat_ids(p.text) + tokens
    # The record and depth whose law is most spread out (highest entropy) tests the most.
    ent = [(-(d[d > 0] * np.log(d[d > 0])).sum(), j, i) for j, r in enumerate(records) for i, d in
           enumerate(r.dists.astype(np.float64))]
    _, j, i = max(ent)
    law = records[j].dists[i].astype(np.float64)
    prefix = text[: records[j].position + 1]
    n = 200
    counts = np.bincount([first_cycle_accepted(pair, prefix, i + 1, Sampling(1.0), seed=s) for s in range(n)],
                         minlength=T_MAX + 1)
    assert counts[law == 0].sum() == 0  # nothing the law rules out ever happens
    keep = law * n >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(law[keep] * n, law[~keep].sum() * n)
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    assert len(observed) >= 2
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_greedy_records_predict_the_mean_tau_of_fixed_depth_decoding(pair, greedy):
    predicted = expected_tau(greedy).mean(0)
    for i in range(1, T_MAX + 1):
        measured = float(np.mean(real_taus(pair, i)))
        if i == T_MAX:  # the same cycles as the records: equal up to float summation order
            assert predicted[i - 1] == pytest.approx(measured, abs=1e-6)
        else:
            assert predicted[i - 1] == pytest.approx(measured, rel=PLACEMENT_TOL), i


def test_at_temperature_one_the_collection_walk_is_the_engines_walk(pair):
    """Seeded alike, collection and depth-t_max decoding sample the very same text, cycle for cycle."""
    for p in PROMPTS[:3]:
        records, tokens = collect_prompt(pair, p, t_max=T_MAX, k=K, temperature=1.0, max_new_tokens=N_NEW)
        res = pair.generate(pair.chat_ids(p.text), f"tree:{T_MAX}", Sampling(1.0), max_new_tokens=N_NEW,
                            seed=prompt_seed(0, p.id))
        assert tokens == res.token_ids
        assert len(records) == len(res.stats.accept_lengths)


def cluster_se(groups: list[list[float]]) -> float:
    """Standard error of the pooled mean sum(all) / count(all) when values within a group (one generated text)
    are correlated: the ratio estimator's between-group variance."""
    y = np.array([sum(g) for g in groups], dtype=np.float64)
    n = np.array([len(g) for g in groups], dtype=np.float64)
    mean = y.sum() / n.sum()
    return float(np.sqrt(len(y) / (len(y) - 1) * ((y - mean * n) ** 2).sum()) / n.sum())


def test_sampled_records_predict_the_mean_tau_of_fixed_depth_decoding(pair, sampled):
    """Temperature 1, within sampling error.

    At i = t_max, decoding seeded like the collection walks the same texts (previous test), so the only noise is
    the acceptance draw given each prefix, whose variance d_t_max itself gives: an exact z-test. For i < t_max the
    texts differ; cycles of one text are strongly correlated (a text that repeats itself is accepted all along), so
    the standard errors are clustered by text; plus the placement allowance of the greedy check."""
    tau = expected_tau(sampled)
    real = np.asarray(sum((pair.generate(pair.chat_ids(p.text), f"tree:{T_MAX}", Sampling(1.0),
                                         max_new_tokens=N_NEW, seed=prompt_seed(0, p.id)).stats.accept_lengths
                           for p in PROMPTS), []), dtype=np.float64)
    var_given_prefix = (dists(sampled)[:, -1] * np.arange(T_MAX + 1) ** 2).sum(-1) - (tau[:, -1] - 1) ** 2
    se = np.sqrt(var_given_prefix.sum()) / len(tau)
    assert abs(tau[:, -1].mean() - real.mean()) <= 4 * se, (tau[:, -1].mean(), real.mean(), se)

    by_prompt = [[t for t, r in zip(tau, sampled) if r.prompt_id == p.id] for p in PROMPTS]
    for i in (1, 2, 4):
        predicted = [[t[i - 1] for t in g] for g in by_prompt]
        measured = [pair.generate(pair.chat_ids(p.text), f"tree:{i}", Sampling(1.0), max_new_tokens=N_NEW,
                                  seed=seed).stats.accept_lengths for p in PROMPTS for seed in (0, 1)]
        mean_p = sum(map(sum, predicted)) / sum(map(len, predicted))
        mean_m = sum(map(sum, measured)) / sum(map(len, measured))
        se = np.hypot(cluster_se(predicted), cluster_se(measured))
        assert abs(mean_p - mean_m) <= 4 * se + PLACEMENT_TOL * mean_m, (i, mean_p, mean_m, se)


# ---- profiling -----------------------------------------------------------------------------------------


def test_profile_costs_are_positive_and_the_cost_file_round_trips(pair, tmp_path):
    out = tmp_path / "costs.json"
    cost = profile_costs(pair, t_max=T_MAX, k=K, prompt_tokens=24, repeats=3, out=out)
    assert min(cost.T_0, cost.T_f, cost.T_eye, cost.ar_step) > 0
    assert cost.t_max == T_MAX
    for key in ("device", "precision", "target", "draft", "date", "total_tokens", "prompt_tokens"):
        assert key in cost.meta
    assert cost.meta["verified_tokens"] == 1 + pair.tree.total_tokens
    back = CostModel.load(out)
    assert back == cost
    assert CostModel.resolve(str(out)).t_gen(T_MAX) == pytest.approx(cost.t_gen(T_MAX))


def test_profile_measures_the_cycle_and_the_ar_step_in_the_decoding_loop(pair, monkeypatch):
    import time

    import radar.decoding.generate as loop

    def slowed(fn):  # 5 ms more per call, in the decoding loop only (the profile's own forwards import their own)
        return lambda *a, **k: (time.sleep(0.005), fn(*a, **k))[1]

    monkeypatch.setattr(loop, "walk", slowed(loop.walk))
    monkeypatch.setattr(loop, "next_token", slowed(loop.next_token))
    cost = profile_costs(pair, t_max=T_MAX, k=K, prompt_tokens=24, repeats=3, loop_tokens=12)
    # 5 ms a cycle injected; T_f's median may overprice the loop's draft calls by a fraction of a millisecond.
    assert cost.T_c >= 0.004 > cost.meta["T_c_bookkeeping"]
    assert cost.ar_step >= cost.meta["ar_forward"] + 0.004


def _slow_inside_decodes(pair, monkeypatch, seconds: float) -> None:
    """Every target forward `seconds` slower inside `ModelPair.generate` than outside it."""
    import time

    inside = [False]
    generate, forward = ModelPair.generate, pair.target.forward

    def decoding(self, *a, **k):
        inside[0] = True
        try:
            return generate(self, *a, **k)
        finally:
            inside[0] = False

    def slowed(*a, **k):
        if inside[0]:
            time.sleep(seconds)
        return forward(*a, **k)

    monkeypatch.setattr(ModelPair, "generate", decoding)
    monkeypatch.setattr(pair.target, "forward", slowed)


def test_profile_prices_the_loop_against_forwards_timed_in_the_same_cycles(pair, monkeypatch):
    # Forwards that run slower in the decoding loop than in the microbenchmarks (here 5 ms each) must not show up
    # as per-cycle overhead or as AR-loop overhead beyond the loop's own forward.
    _slow_inside_decodes(pair, monkeypatch, 0.005)
    cost = profile_costs(pair, t_max=T_MAX, k=K, prompt_tokens=24, repeats=3, loop_tokens=12)
    assert cost.T_c < 0.004
    assert cost.ar_step < cost.meta["ar_forward"] * cost.meta["forward_scale"] + 0.004


def test_profile_prices_every_forward_at_the_loops_pace(pair, monkeypatch):
    _slow_inside_decodes(pair, monkeypatch, 0.005)
    cost = profile_costs(pair, t_max=T_MAX, k=K, prompt_tokens=24, repeats=3, loop_tokens=12)
    scale = cost.meta["forward_scale"]
    assert cost.meta["ar_forward"] * scale >= cost.meta["ar_forward"] + 0.004
    assert cost.ar_step >= cost.meta["ar_forward"] + 0.004
    assert cost.T_0 == pytest.approx(cost.meta["T_0_microbench"] * scale)
    assert cost.verify_s == pytest.approx([v * scale for v in monotone(cost.meta["verify_s_measured"])])


def test_profile_rejects_a_prompt_longer_than_the_context(pair):
    with pytest.raises(ValueError, match="prompt-tokens"):
        profile_costs(pair, prompt_tokens=pair.target.config.max_position_embeddings, repeats=1)


# ---- other budgets, from the records' nodes --------------------------------------------------------------


def test_nodes_reproduce_every_d_i_at_the_collection_budget(sampled):
    records = RecordSet.from_records(sampled)
    assert records.budget == 16 and records.nodes is not None
    grid = budget_dists(records, [16])[:, :, 0]
    assert torch.allclose(grid, records.dists, atol=1e-5)


@pytest.mark.parametrize("calls,budget", [(1, 3), (2, 5), (4, 8), (8, 2)])
def test_a_smaller_budget_gives_what_the_engine_accepts_with_that_budget(pair, greedy, calls, budget):
    records = RecordSet.from_records(greedy)
    grid = budget_dists(records, [budget])[:, calls - 1, 0]
    firsts = [n for n, r in enumerate(greedy) if n == 0 or greedy[n - 1].prompt_id != r.prompt_id]
    for n in firsts:
        prefix = pair.chat_ids(PROMPTS[int(greedy[n].prompt_id[1:])].text)
        res = pair.generate(prefix, f"tree:{calls}@{budget}", max_new_tokens=1)
        assert int(grid[n].argmax()) == res.stats.accept_lengths[0] - 1
        assert float(grid[n].max()) == pytest.approx(1.0)


def test_a_budget_above_the_collection_budget_is_refused(greedy):
    with pytest.raises(ValueError, match="budgets must be in 1..16"):
        budget_dists(RecordSet.from_records(greedy), [32])
