"""Continuous batching in the engine: concurrent decodes whose model calls run as packed forwards give each
request exactly its single-request output, share no state, and may join and leave at any cycle; the load-aware
policy shrinks trees as the batch grows."""

from __future__ import annotations

import threading

import pytest
import torch

from radar.decoding.arms import DraftOrNot
from radar.decoding.batching import LoadAware, Rendezvous, VerifyCurve, measure_verify_curve
from radar.decoding.methods import Method
from radar.decoding.model import LayerCapture
from radar.decoding.packed import packed_forward, packed_head_forward
from radar.decoding.pair import ModelPair
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import TreeConfig
from radar.decoding.verify import Sampling

from tiny_models import make_tiny_eagle3, random_ids

PROMPTS = [[1, 5, 9, 13], [1, 40, 41], [1, 7, 7, 7, 8, 100, 3], [1, 200], [1, 60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def pair(tiny_pair) -> ModelPair:
    target, draft = tiny_pair
    return ModelPair.load(target, draft, device="cpu", dtype="float32", tree=TreeConfig(2, 4, 8))


@pytest.fixture(scope="module")
def eagle_pair(pair) -> ModelPair:
    head = make_tiny_eagle3(pair.target, draft_vocab=64).bind(pair.target)
    return ModelPair(pair.target, head, pair.tokenizer, TreeConfig(2, 4, 8))


def batched(pair: ModelPair, jobs: list[tuple[list[int], str, int]], sampling=Sampling(), starts=None):
    """Run `jobs` (prompt, method, max tokens) concurrently through one rendezvous; returns (results, rendezvous).
    `starts[i]` is an event job i waits for before it joins."""
    rv, out = Rendezvous(), [None] * len(jobs)
    view = pair.batched(rv)

    def run(i: int) -> None:
        if starts is not None:
            starts[i].wait()
        with rv.member():
            prompt, method, n = jobs[i]
            out[i] = view.generate(prompt, method, sampling, n, seed=i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a batched decode hung"
    return out, rv


@pytest.mark.parametrize("method", ["ar", "tree:3", "chain:2"])
def test_batched_greedy_output_equals_each_requests_single_output(pair, method):
    jobs = [(p, method, 20) for p in PROMPTS]
    single = [pair.generate(p, method, Sampling(), 20, seed=i).token_ids for i, (p, _, _) in enumerate(jobs)]
    results, rv = batched(pair, jobs)
    assert [r.token_ids for r in results] == single
    assert rv.calls > rv.forwards  # calls really were packed together


def test_batched_eagle3_output_equals_single_output(eagle_pair):
    jobs = [(p, "tree:3", 16) for p in PROMPTS]
    single = [eagle_pair.generate(p, "tree:3", Sampling(), 16).token_ids for p in PROMPTS]
    results, rv = batched(eagle_pair, jobs)
    assert [r.token_ids for r in results] == single and rv.calls > rv.forwards


def test_requests_with_different_methods_and_lengths_batch_together(pair):
    jobs = [(PROMPTS[0], "ar", 5), (PROMPTS[1], "tree:2", 30), (PROMPTS[2], "tree:4", 12), (PROMPTS[3], "ar", 25)]
    single = [pair.generate(p, m, Sampling(), n).token_ids for p, m, n in jobs]
    results, _ = batched(pair, jobs)
    assert [r.token_ids for r in results] == single
    assert [len(r.token_ids) for r in results] == [5, 30, 12, 25]


def test_a_request_joining_mid_batch_gets_its_single_output(pair):
    rv, out = Rendezvous(), {}
    view, joined = pair.batched(rv), threading.Event()

    def first():
        with rv.member():
            def watch(ids):
                if len(out.setdefault("seen", [])) >= 6:
                    joined.set()  # let the second request in while this one is mid-decode
                out["seen"] += ids
            out["first"] = view.generate(PROMPTS[0], "tree:3", Sampling(), 40, on_commit=watch).token_ids

    def second():
        joined.wait(30)
        with rv.member():
            out["second"] = view.generate(PROMPTS[4], "tree:3", Sampling(), 10).token_ids
            out["first_done_before"] = "first" in out

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out["first"] == pair.generate(PROMPTS[0], "tree:3", Sampling(), 40).token_ids
    assert out["second"] == pair.generate(PROMPTS[4], "tree:3", Sampling(), 10).token_ids
    assert not out["first_done_before"]  # they really overlapped


def test_sampled_batched_requests_follow_their_own_seeds(pair):
    # Each request's generator is its own: the same seed alone and in a batch draws the same tokens.
    sampling = Sampling(temperature=1.0)
    jobs = [(p, "tree:3", 16) for p in PROMPTS]
    single = [pair.generate(p, "tree:3", sampling, 16, seed=i).token_ids for i, p in enumerate(PROMPTS)]
    results, _ = batched(pair, jobs, sampling)
    assert [r.token_ids for r in results] == single


def test_a_failing_request_leaves_the_batch_and_the_others_finish(pair):
    rv = Rendezvous()
    view = pair.batched(rv)
    out, errors = {}, {}

    def run(name, prompt, n):
        with rv.member():
            try:
                out[name] = view.generate(prompt, "tree:3", Sampling(), n).token_ids
            except ValueError as exc:
                errors[name] = str(exc)

    too_long = list(range(1, 1030))  # past the tiny model's 1024-token context
    threads = [threading.Thread(target=run, args=("ok", PROMPTS[0], 20)),
               threading.Thread(target=run, args=("bad", too_long, 20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "context" in errors["bad"] and out["ok"] == pair.generate(PROMPTS[0], "tree:3", Sampling(), 20).token_ids
    assert rv.members == 0


def test_packed_forward_keeps_sequences_apart(pair):
    # Two sequences in one packed forward give each the logits, cache and captured features it gets alone.
    target = pair.target
    a, b = random_ids(6, 300, seed=1), random_ids(9, 300, seed=2)
    alone = []
    for ids in (a, b):
        cache, cap = target.new_cache(32), LayerCapture((0,))
        alone.append((target(ids, cache=cache, capture=cap), cache, cap.hidden))
    caches, caps = [target.new_cache(32), target.new_cache(32)], [LayerCapture((0,)), LayerCapture((0,))]
    calls = [dict(input_ids=ids, position_ids=None, cache=c, tree_mask=None, last_only=False, capture=cap)
             for ids, c, cap in zip((a, b), caches, caps)]
    packed = packed_forward(target, calls)
    for (logits, cache, hidden), got, c, cap in zip(alone, packed, caches, caps):
        assert torch.equal(got, logits) and torch.equal(cap.hidden, hidden)
        assert c.length == cache.length and torch.equal(c.k[:, :, :, : c.length], cache.k[:, :, :, : c.length])


def test_packed_head_forward_matches_the_heads_own(eagle_pair):
    head, gen = eagle_pair.draft, torch.Generator().manual_seed(0)
    calls, alone = [], []
    for seed, q, last_only in ((1, 3, False), (2, 5, True), (3, 4, False)):
        ids, hidden = random_ids(q, 300, seed=seed), torch.randn(1, q, head.config.layer.hidden_size, generator=gen)
        pos = torch.arange(q)[None]
        c1, c2 = head.new_cache(16), head.new_cache(16)
        alone.append(head(ids, hidden, pos, c1, last_only=last_only))
        calls.append(dict(input_ids=ids, hidden=hidden, position_ids=pos, cache=c2, tree_mask=None,
                          last_only=last_only))
    for (logits, h), (got_logits, got_h) in zip(alone, packed_head_forward(head, calls)):
        assert got_logits.shape == logits.shape and got_h.shape == h.shape
        # Packed rows go through matmuls of another shape: equal up to float32 rounding, not bit for bit.
        assert torch.allclose(got_logits, logits, atol=1e-5) and torch.allclose(got_h, h, atol=1e-5)


def test_head_last_only_gives_the_last_tokens_logits_and_every_tokens_hidden_state(eagle_pair):
    head = eagle_pair.draft
    ids, hidden, pos = random_ids(5, 300, seed=4), torch.randn(1, 5, head.config.layer.hidden_size), torch.arange(5)[None]
    logits, h = head(ids, hidden, pos, head.new_cache(8))
    last, h_last = head(ids, hidden, pos, head.new_cache(8), last_only=True)
    assert last.shape[1] == 1 and torch.allclose(last, logits[:, -1:], atol=1e-6) and torch.equal(h_last, h)


def test_verify_curve_is_measured_monotone_and_interpolates(pair):
    curve = measure_verify_curve(pair.target, sizes=(1, 4, 16), context=8, repeats=1)
    assert curve.tokens == [1, 4, 16] and curve.seconds == sorted(curve.seconds) and curve.seconds[0] > 0
    line = VerifyCurve([1, 11], [1.0, 2.0])
    assert line(6) == pytest.approx(1.5) and line(21) == pytest.approx(3.0) and line.slope(3) == pytest.approx(0.1)


class _Load:
    """A rendezvous stand-in with a fixed load: members, tokens/s and tokens in the last target forward."""

    def __init__(self, members, rate, tokens):
        self.members, self._rate, self.target_tokens = members, rate, tokens

    def rate(self):
        return self._rate


def test_load_aware_trees_shrink_as_the_batch_grows():
    curve = VerifyCurve([1, 64, 256], [0.01, 0.02, 0.10])  # compute-bound past 64 tokens
    ranked = torch.log(torch.tensor([0.9, 0.6, 0.3, 0.1, 0.05]))
    alone = LoadAware(FixedDepth(4), _Load(1, 100.0, 6), curve)
    small = LoadAware(FixedDepth(4), _Load(4, 200.0, 24), curve)
    big = LoadAware(FixedDepth(4), _Load(16, 400.0, 96), curve)
    assert alone.cap_budget(ranked, 5) == 5  # alone: the policy's own budget
    kept_small, kept_big = small.cap_budget(ranked, 5), big.cap_budget(ranked, 5)
    assert kept_small > kept_big  # 200 tok/s * 0.16 ms/token: p >= 0.03; 400 * 0.5 ms: p >= 0.2
    assert (kept_small, kept_big) == (5, 3)
    # No node pays at all: the root alone is verified (no speculation), and drafting stops after one call.
    none = LoadAware(FixedDepth(4), _Load(16, 4000.0, 96), curve)
    assert none.cap_budget(ranked, 5) == 0 and not none.decide(1, ranked[:2])


def test_cycles_that_prefill_a_newcomer_are_not_credited_to_either_arm(pair):
    class Recorder(DraftOrNot):
        def observe(self, members, tokens_per_s):
            seen.append(tokens_per_s)

    seen: list[float] = []
    rv = Rendezvous(pair.target)
    rv.arms = Recorder()
    echo = lambda model, calls: [None] * len(calls)  # noqa: E731 - the forward itself does not matter here
    for last_only in (True, False):
        rv.committed(4)
        rv.call(pair.target, echo, {"input_ids": torch.zeros(1, 3, dtype=torch.long), "last_only": last_only})
    assert len(seen) == 1  # only the verification-only cycle was measured


@pytest.mark.parametrize("drafter", ["small-lm", "eagle3"])
def test_cycles_that_skip_drafting_keep_the_output_and_the_drafter_in_step(pair, eagle_pair, drafter):
    from radar.decoding.generate import generate_speculative

    class EveryOther(FixedDepth):
        cycle = 0

        def skip_draft(self):
            self.cycle += 1
            return self.cycle % 3 != 0  # two root-only cycles, then a drafted one

    p = pair if drafter == "small-lm" else eagle_pair
    ids = PROMPTS[2]
    spec = generate_speculative(p.target, p.drafter(), ids, p.tree, EveryOther(3), Sampling(), 30)
    assert spec.token_ids == p.generate(ids, "ar", Sampling(), 30).token_ids
    assert 0 in spec.stats.tree_tokens_per_cycle and max(spec.stats.accept_lengths) > 1  # drafts still accepted


def test_a_root_only_verification_is_the_autoregressive_step(pair):
    from radar.decoding.tree import empty_tree
    from radar.decoding.verify import prefill, verify_tree

    ids = torch.tensor(PROMPTS[2])
    caches = [pair.target.new_cache(32) for _ in range(2)]
    pending = [prefill(pair.target, c, ids) for c in caches][0]
    ar_step = pair.target(pending[None], cache=caches[0])[0]
    logits, base = verify_tree(pair.target, caches[1], pending, empty_tree(0, ids.device), len(ids) - 1)
    assert torch.equal(logits, ar_step) and base == caches[1].length == caches[0].length  # the same bits


def test_a_drafter_sitting_out_cycles_is_fed_every_token_and_feature_it_missed(eagle_pair):
    from radar.decoding.session import Speculation
    from radar.decoding.tree import build_tree, empty_tree

    ids, drafter = PROMPTS[2], eagle_pair.drafter()
    spec = Speculation(eagle_pair.target, drafter, ids, 32)
    bonuses = []
    for root in range(len(ids) - 1, len(ids) + 2):  # three undrafted cycles
        logits, base = spec.verify(empty_tree(drafter.length, spec.target_pending.device), root)
        bonuses.append(int(logits[0].argmax()))
        spec.commit_undrafted(base, bonuses[-1])
    assert spec.draft_pending.tolist() == ids + bonuses
    # Drafting again feeds the head everything (it raises on tokens without features): all but the first token.
    tree = build_tree(drafter, spec.draft_pending, len(ids) + 2, eagle_pair.tree, FixedDepth(1))
    assert len(tree) > 0 and drafter.length == len(ids) + len(bonuses) - 1


def test_a_zero_node_tree_decodes_like_autoregression(pair):
    class Never(FixedDepth):
        def cap_budget(self, ranked, budget):
            return 0

    from radar.decoding.generate import generate_speculative

    ids = PROMPTS[2]
    spec = generate_speculative(pair.target, pair.drafter(), ids, pair.tree, Never(3), Sampling(), 12)
    assert spec.token_ids == pair.generate(ids, "ar", Sampling(), 12).token_ids
    assert spec.stats.tau == 1.0 and set(spec.stats.tree_tokens_per_cycle) == {0}


def test_logprobs_are_the_targets_own_distribution_for_every_method(pair):
    ids = PROMPTS[0]
    ar = pair.generate(ids, "ar", Sampling(), 10, logprobs=3)
    spec = pair.generate(ids, "tree:3", Sampling(), 10, logprobs=3)
    assert spec.token_ids == ar.token_ids and len(spec.logprobs) == 10
    for (lp_a, alts_a), (lp_s, alts_s), token in zip(ar.logprobs, spec.logprobs, ar.token_ids):
        assert lp_s == pytest.approx(lp_a, abs=1e-4) and [a for a, _ in alts_s] == [a for a, _ in alts_a]
        assert alts_a[0][0] == token  # greedy: the chosen token is the likeliest
    # Independent reference: the full sequence's logits from one plain forward.
    full = torch.tensor([ids + ar.token_ids])
    logp = torch.log_softmax(pair.target(full)[0].float(), -1)
    want = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(ar.token_ids)]
    assert [lp for lp, _ in spec.logprobs] == pytest.approx(want, abs=1e-4)
    assert Method.parse("tree:3").speculative


def test_a_batched_request_whose_controller_does_not_draft_decodes_with_the_target_alone(pair):
    from radar.controller.policy import ControllerConfig, ControllerPolicy, LSTMController

    controller = LSTMController(ControllerConfig(input_size=2, hidden_size=8, mlp_hidden=8))
    rv = Rendezvous()
    policy = LoadAware(ControllerPolicy(controller, drafts=False), rv, VerifyCurve([1, 8], [0.01, 0.02]))
    prompt = random_ids(6, pair.target.config.vocab_size, seed=11)[0].tolist()
    with rv.member():
        res = pair.batched(rv).generate(prompt, "radar", max_new_tokens=12, policy=policy)
    assert res.token_ids == pair.generate(prompt, "ar", max_new_tokens=12).token_ids
    assert res.stats.draft_calls_per_cycle == []
