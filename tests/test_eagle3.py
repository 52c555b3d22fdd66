"""Decoding with an EAGLE-3 head: output identical to the target alone (greedy) or distributed like it (sampling),
the head fed the target's features with EAGLE-3's alignment, and a trained head accepting more than a random one.

Targets are tiny random Llamas conditioned as in test_generate (well-separated greedy paths). Heads are random
(`make_tiny_eagle3`) or trained here for 200 steps on the target's own greedy text (`trained_head`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from radar.decoding.eagle3 import Eagle3Drafter, Eagle3Head
from radar.decoding.generate import generate_ar, generate_speculative
from radar.decoding.model import LayerCapture, Transformer
from radar.decoding.pair import ModelPair
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import TreeConfig, build_tree
from radar.decoding.verify import Sampling

from test_generate import N_RUNS, P_MIN, SMALL, SMALL_NEW, SMALL_PROMPT, condition, exact_law, hf_greedy, prefix_p_values
from tiny_models import load_hf_model, make_tiny_eagle3, make_tiny_llama, random_ids

VOCAB, N_NEW = 128, 16
# name: (make_tiny_llama arguments, condition arguments, EAGLE-3 layer ids)
TARGETS = {
    "gqa": (dict(layers=4, heads=4, kv_heads=2, seed=0), dict(logit_gain=4.0), (0, 1, 2)),
    "tied": (dict(layers=2, heads=4, kv_heads=4, tie=True, seed=2), dict(residual_gain=6.0, embed_gain=0.5), None),
    "odd_hidden": (dict(layers=3, hidden=36, heads=3, kv_heads=1, seed=4), dict(logit_gain=4.0), (2, 0, 1)),
}
# name: make_tiny_eagle3 arguments (besides layer ids): the target's embedding, or its own of another width
HEADS = {"shared_embedding": dict(draft_vocab=48), "own_embedding": dict(draft_vocab=96, hidden=40, embedding=True)}


def tree_method(method: str, depth: int) -> tuple[TreeConfig, FixedDepth]:
    if method == "chain":
        return TreeConfig(branching=1, max_calls=depth, total_tokens=depth), FixedDepth(depth)
    return TreeConfig(branching=3, max_calls=depth, total_tokens=4 * depth), FixedDepth(depth)


def speculate(target, head, prompt, method, depth=4, sampling=Sampling(), max_new_tokens=N_NEW, generator=None):
    cfg, policy = tree_method(method, depth)
    return generate_speculative(target, Eagle3Drafter(head), prompt, cfg, policy, sampling, max_new_tokens, generator)


@dataclass
class Target:
    model: Transformer
    hf: torch.nn.Module
    layer_ids: tuple[int, ...] | None


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("eagle3"), {}
    for name, (kwargs, gains, ids) in TARGETS.items():
        path = condition(make_tiny_llama(root, name=name, vocab=VOCAB, **kwargs), **gains)
        out[name] = Target(Transformer.from_pretrained(path), load_hf_model(path), ids)
    return out


def random_head(target: Target, kind: str, seed: int = 0) -> Eagle3Head:
    return make_tiny_eagle3(target.model, layer_ids=target.layer_ids, seed=seed, **HEADS[kind]).bind(target.model)


def greedy_text(target: Transformer, n_seqs: int, prompt_len: int, new: int, seed: int) -> torch.Tensor:
    """The target's own greedy continuations of random prompts, batched: (n_seqs, prompt_len + new)."""
    seq = random_ids(prompt_len, VOCAB, batch=n_seqs, seed=seed)
    cache = target.new_cache(prompt_len + new, batch=n_seqs)
    with torch.inference_mode():
        logits = target(seq, cache=cache, last_only=True)
        for _ in range(new):
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            logits = target(seq[:, -1:], cache=cache)
    return seq.clone()  # out of inference mode, so training can use it


def train_step_one(head: Eagle3Head, target: Transformer, seq: torch.Tensor, steps: int, batch: int = 16) -> Eagle3Head:
    """Teacher-forced training of the first draft step: input (features at t, token t+1), label the target's
    greedy token t+2 (its argmax after t+1). The draft vocabulary is the whole target vocabulary here."""
    capture = LayerCapture(head.config.layer_ids)
    with torch.no_grad():
        labels = target(seq, capture=capture).argmax(-1)[:, 1:-1]
    inputs, features = seq[:, 1:-1], capture.hidden[:, :-2]
    positions = torch.arange(1, seq.shape[1] - 1).expand_as(inputs)
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    head.train()
    for _ in range(steps):
        b = torch.randint(0, seq.shape[0], (batch,), generator=gen)
        logits, _ = head(inputs[b], head.project(features[b]), positions[b])
        loss = F.cross_entropy(logits.flatten(0, 1), labels[b].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@pytest.fixture(scope="module")
def trained(targets):
    """(untrained, trained) heads on the gqa target: the same initialisation, before and after 200 steps."""
    target = targets["gqa"]
    untrained = make_tiny_eagle3(target.model, draft_vocab=VOCAB, layer_ids=target.layer_ids, seed=7).bind(target.model)
    head = make_tiny_eagle3(target.model, draft_vocab=VOCAB, layer_ids=target.layer_ids, seed=7).bind(target.model)
    return untrained, train_step_one(head, target.model, greedy_text(target.model, 256, 8, 40, seed=1000), steps=200)


def mean_tau(target: Transformer, head: Eagle3Head, method: str, depth: int) -> float:
    """Mean tokens per target call over held-out prompts (seeds the training text never used)."""
    taus = [speculate(target, head, random_ids(8, VOCAB, seed=s)[0].tolist(), method, depth, max_new_tokens=40).stats.tau
            for s in range(6)]
    return sum(taus) / len(taus)


# ------------------------------------------------------------------------------------------ greedy equality


@pytest.mark.parametrize("prompt_len", [1, 10], ids=lambda n: f"prompt{n}")
@pytest.mark.parametrize("method", ["tree", "chain"])
@pytest.mark.parametrize("head_kind", HEADS)
@pytest.mark.parametrize("shape", TARGETS)
def test_greedy_with_a_random_head_equals_ar_and_transformers_generate(targets, shape, head_kind, method, prompt_len):
    target, prompt = targets[shape], random_ids(prompt_len, VOCAB, seed=prompt_len)[0].tolist()
    ar = generate_ar(target.model, prompt, Sampling(), N_NEW).token_ids
    result = speculate(target.model, random_head(target, head_kind), prompt, method)
    assert result.token_ids == ar
    assert result.token_ids == hf_greedy(target.hf, prompt, N_NEW)


@pytest.mark.parametrize("prompt_len", [1, 10], ids=lambda n: f"prompt{n}")
@pytest.mark.parametrize("method, depth", [("tree", 3), ("tree", 6), ("chain", 4)])
def test_greedy_with_a_trained_head_equals_ar_and_transformers_generate(targets, trained, method, depth, prompt_len):
    target, prompt = targets["gqa"], random_ids(prompt_len, VOCAB, seed=50 + prompt_len)[0].tolist()
    result = speculate(target.model, trained[1], prompt, method, depth, max_new_tokens=40)
    assert max(result.stats.accept_lengths) > 1, "the trained head should get drafts accepted"
    assert result.token_ids == generate_ar(target.model, prompt, Sampling(), 40).token_ids
    assert result.token_ids == hf_greedy(target.hf, prompt, 40)


def test_a_trained_head_accepts_clearly_more_than_an_untrained_one(targets, trained):
    untrained, head = trained
    before = mean_tau(targets["gqa"].model, untrained, "chain", 4)
    after = mean_tau(targets["gqa"].model, head, "chain", 4)
    assert before < 1.1
    assert after > before + 0.2


# -------------------------------------------------------------------------------------- feature alignment


def teacher_forced(head: Eagle3Head, target: Transformer, committed: list[int], n: int):
    """The head's keys, values and output hidden states for its first n slots, computed in one pass over the
    committed text: slot j holds token j+1 with the target's features of token j."""
    capture = LayerCapture(head.config.layer_ids)
    with torch.inference_mode():
        target(torch.tensor([committed]), capture=capture)
        cache = head.new_cache(n)
        ids, positions = torch.tensor([committed[1 : n + 1]]), torch.arange(1, n + 1)[None]
        _, hidden = head(ids, head.project(capture.hidden[:, :n]), positions, cache)
    return cache, hidden[0]


@pytest.mark.parametrize("method", ["tree", "chain"])
def test_the_drafter_state_after_generation_equals_teacher_forcing_on_the_committed_text(targets, trained, method):
    """Every committed slot, accepted draft nodes included, reads the target's features of the token before it."""
    target, head = targets["gqa"].model, trained[1]
    prompt, drafter = random_ids(10, VOCAB, seed=3)[0].tolist(), Eagle3Drafter(head)
    cfg, policy = tree_method(method, 4)
    result = generate_speculative(target, drafter, prompt, cfg, policy, Sampling(), 30)
    assert max(result.stats.accept_lengths) > 1, "accepted nodes must be fed again for this test to mean anything"
    n = drafter.length
    assert n > len(prompt) + 15
    cache, hidden = teacher_forced(head, target, prompt + result.token_ids, n)
    torch.testing.assert_close(drafter.cache.k[:, :, :, :n], cache.k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(drafter.cache.v[:, :, :, :n], cache.v, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(drafter.hidden_out[:n], hidden, atol=1e-5, rtol=1e-4)


def test_a_tree_node_reads_its_parents_output_hidden_state(targets):
    target = targets["gqa"]
    head, prompt = random_head(target, "shared_embedding"), random_ids(6, VOCAB, seed=9)[0]
    capture = LayerCapture(head.config.layer_ids)
    with torch.inference_mode():
        target.model(prompt[None], capture=capture)
        drafter = Eagle3Drafter(head)
        drafter.begin(16)
        drafter.observe_target(capture.hidden[0, :-1])
        drafter.forward(prompt, torch.arange(6), None)
        # Two children of the root (position 6), then a child of the first of them (position 7).
        children = drafter.forward(torch.tensor([3, 4]), torch.tensor([6, 6]), torch.eye(2, dtype=torch.bool))
        grandchild = drafter.forward(torch.tensor([5]), torch.tensor([7]), torch.tensor([[True, False, True]]))

        cache = head.new_cache(16)
        _, h = head(prompt[None, 1:], head.project(capture.hidden[:, :-1]), torch.arange(1, 6)[None], cache)
        root = h[:, -1:].expand(1, 2, -1)
        logits1, h1 = head(torch.tensor([[3, 4]]), root, torch.tensor([[6, 6]]), cache, torch.eye(2, dtype=torch.bool))
        logits2, _ = head(torch.tensor([[5]]), h1[:, :1], torch.tensor([[7]]), cache, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(children, torch.log_softmax(logits1[0], -1))
    torch.testing.assert_close(grandchild, torch.log_softmax(logits2[0], -1))


def test_drafted_tokens_are_target_ids_from_the_draft_vocabulary(targets):
    target = targets["gqa"]
    head, prompt = random_head(target, "shared_embedding"), random_ids(10, VOCAB, seed=11)[0]
    drafter, capture = Eagle3Drafter(head), LayerCapture(head.config.layer_ids)
    drafter.begin(64)
    with torch.inference_mode():
        target.model(prompt[None], capture=capture)
        drafter.observe_target(capture.hidden[0, :-1])
        tree = build_tree(drafter, prompt, 9, *tree_method("tree", 3))
    assert drafter.vocab_size == 48
    assert len(tree) == 12 and head.t2d[tree.tokens].all()


def test_target_capture_gives_the_layer_outputs_transformers_reports(targets):
    target, ids = targets["gqa"], random_ids(12, VOCAB, seed=5)
    capture = LayerCapture((2, 0))
    with torch.no_grad():
        logits = target.model(ids, capture=capture)
        hf = target.hf(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(logits, target.model(ids))  # capturing changes nothing else
    expected = torch.cat((hf.hidden_states[3], hf.hidden_states[1]), dim=-1)  # hidden_states[i + 1]: after layer i
    torch.testing.assert_close(capture.hidden, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------- through ModelPair


def test_a_model_pair_loads_an_eagle3_head_dir_and_decodes_with_it(tiny_pair, tmp_path):
    target_dir, _ = tiny_pair
    target = Transformer.from_pretrained(target_dir)
    make_tiny_eagle3(target, draft_vocab=64, layer_ids=(0, 1, 1)).save_pretrained(tmp_path / "head")
    pair = ModelPair.load(target_dir, tmp_path / "head", device="cpu")
    assert isinstance(pair.drafter(), Eagle3Drafter)
    prompt = pair.encode("def add(a, b):")
    for method in ("tree:3", "chain:2"):
        assert pair.generate(prompt, method, max_new_tokens=12).token_ids == pair.generate(prompt, "ar", max_new_tokens=12).token_ids


# ----------------------------------------------------------------------------------- sampling is lossless


@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    path = condition(make_tiny_llama(tmp_path_factory.mktemp("small"), name="target", seed=0, **SMALL), logit_gain=2.0)
    model = Transformer.from_pretrained(path)
    # A draft vocabulary of 6 of the 8 tokens: the target still produces the other two.
    return model, load_hf_model(path), make_tiny_eagle3(model, draft_vocab=6, seed=3).bind(model)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tree", "chain"])
def test_sampled_with_an_eagle3_head_matches_the_exact_target_distribution(small_target, method):
    target, hf, head = small_target
    sampling, gen, counts, accept = Sampling(1.0), torch.Generator().manual_seed(0), Counter(), []
    cfg, policy = (TreeConfig(2, 2, 4), FixedDepth(2)) if method == "tree" else (TreeConfig(1, 2, 2), FixedDepth(2))
    for _ in range(N_RUNS):
        r = generate_speculative(target, Eagle3Drafter(head), SMALL_PROMPT, cfg, policy, sampling, SMALL_NEW, gen)
        counts[tuple(r.token_ids)] += 1
        accept += r.stats.accept_lengths
    assert 1 in accept and max(accept) > 1, "the head's drafts should be both rejected and accepted"
    assert min(prefix_p_values(counts, exact_law(hf, sampling))) > P_MIN / SMALL_NEW
