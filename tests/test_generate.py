"""The generate loops: speculative decoding reproduces autoregressive decoding exactly (greedy), stops where it
should (EOS, max_new_tokens, the context), and samples from the target's own distribution (temperature, top-p).

Models are tiny random-init Llama checkpoints from `tiny_models.make_tiny_llama`, *conditioned* before use
(`condition`): random weights give near-uniform next-token distributions, so greedy paths would hinge on tiny logit
gaps, a draft would rarely agree with the target, and the rerank would never keep a deep path. Scaling the final
norm's weight multiplies every logit by the same factor (a temperature of 1/gain baked into the checkpoint), which
makes the greedy path well separated and lets a similar draft agree with it. With tied embeddings the output
matrix is the input embedding, so every position predicts its own input token (logit |e|^2) and generation repeats
one token; shrinking the embeddings and amplifying the blocks' residual writes (o_proj, down_proj) breaks that.
Both transformers and our model load the conditioned checkpoint, so comparisons stay exact.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare

import radar.decoding.generate as generate_module
from radar.decoding.drafters import SmallLMDrafter
from radar.decoding.generate import generate_ar, generate_speculative
from radar.decoding.methods import Method
from radar.decoding.model import Transformer
from radar.decoding.session import DecodeSession
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import TreeConfig
from radar.decoding.verify import Sampling, next_token, target_probs

from tiny_models import load_hf_model, make_tiny_llama, random_ids


VOCAB = 128
N_NEW = 16  # new tokens in the greedy comparisons: several cycles at every depth
DEPTHS = range(1, 9)
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


def condition(path: Path, *, logit_gain: float = 1.0, residual_gain: float = 1.0, embed_gain: float = 1.0) -> Path:
    """Rescale a saved checkpoint in place (see the module docstring for why)."""
    file = path / "model.safetensors"
    state = load_file(file)
    for name in state:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] *= residual_gain
    state["model.embed_tokens.weight"] *= embed_gain
    state["model.norm.weight"] *= logit_gain
    save_file(state, file, metadata={"format": "pt"})
    return path


def with_eos(path: Path, dest: Path, eos: int) -> Path:
    """A copy of a checkpoint whose config (and generation config) name `eos` as the end-of-sequence token."""
    shutil.copytree(path, dest)
    for name in ("config.json", "generation_config.json"):
        file = dest / name
        if file.exists():
            cfg = json.loads(file.read_text())
            cfg["eos_token_id"] = eos
            file.write_text(json.dumps(cfg))
    return dest


def add_weight_noise(model: Transformer, rel: float, seed: int) -> Transformer:
    """A copy of `model` with Gaussian noise of `rel` times each tensor's std added to every weight."""
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(rel * p.std() * torch.randn(p.shape, generator=gen))
    return noisy


# name: (make_tiny_llama arguments, condition arguments)
SHAPES = {
    "gqa": (dict(heads=4, kv_heads=2, seed=0), dict(logit_gain=4.0)),
    "tied": (dict(heads=4, kv_heads=4, tie=True, seed=2), dict(residual_gain=6.0, embed_gain=0.5)),
    "llama3_rope": (dict(heads=4, kv_heads=2, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, seed=3), dict(logit_gain=4.0)),
}
PROMPT_LENGTHS = (1, 10, 100)


@dataclass
class Pair:
    """A target checkpoint with the drafts it is tested against and its transformers twin."""

    path: Path
    target: Transformer
    drafts: dict[str, Transformer]  # same (accepts everything), noisy (agrees often), independent (rarely)
    hf: torch.nn.Module


class Zoo:
    """Builds each model once per module, on first use."""

    def __init__(self, root: Path):
        self.root, self.pairs, self.refs = root, {}, {}

    def pair(self, shape: str) -> Pair:
        if shape not in self.pairs:
            kwargs, gains = SHAPES[shape]
            path = condition(make_tiny_llama(self.root, name=shape, vocab=VOCAB, **kwargs), **gains)
            other = dict(kwargs, seed=kwargs["seed"] + 100)
            independent = condition(make_tiny_llama(self.root, name=f"{shape}-independent", vocab=VOCAB, **other), **gains)
            target = Transformer.from_pretrained(path)
            drafts = {
                "same": target,
                "noisy": add_weight_noise(target, 0.05, seed=1),
                "independent": Transformer.from_pretrained(independent),
            }
            self.pairs[shape] = Pair(path, target, drafts, load_hf_model(path))
        return self.pairs[shape]

    def greedy_refs(self, shape: str, prompt_len: int) -> tuple[list[int], list[int], list[int]]:
        """(prompt, AR tokens, transformers generate tokens) for N_NEW greedy tokens."""
        key = (shape, prompt_len)
        if key not in self.refs:
            pair, prompt = self.pair(shape), prompt_ids(prompt_len)
            ar = generate_ar(pair.target, prompt, Sampling(), N_NEW).token_ids
            self.refs[key] = (prompt, ar, hf_greedy(pair.hf, prompt, N_NEW))
        return self.refs[key]


def prompt_ids(length: int, vocab: int = VOCAB) -> list[int]:
    return random_ids(length, vocab, seed=length)[0].tolist()


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], n: int, exact_length: bool = True) -> list[int]:
    extra = dict(min_new_tokens=n) if exact_length else {}
    ids = torch.tensor([prompt])  # an explicit all-ones mask: else transformers masks prompt tokens equal to pad
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0, **extra)
    return out[0, len(prompt) :].tolist()


def tree_method(method: str, depth: int, k: int = 3) -> tuple[TreeConfig, FixedDepth]:
    """`tree:D` (k-ary dynamic tree, 4 nodes per level verified) or `chain:D` (one draft per call)."""
    if method == "chain":
        return TreeConfig(branching=1, max_calls=depth, total_tokens=depth), FixedDepth(depth)
    return TreeConfig(branching=k, max_calls=depth, total_tokens=4 * depth), FixedDepth(depth)


def speculate(target, draft, prompt, method, depth, sampling=Sampling(), max_new_tokens=N_NEW, generator=None):
    cfg, policy = tree_method(method, depth)
    return generate_speculative(target, SmallLMDrafter(draft), prompt, cfg, policy, sampling, max_new_tokens, generator)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("generate"))


# ------------------------------------------------------------------------------------------ greedy equality


@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS, ids=lambda n: f"prompt{n}")
@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_ar_equals_transformers_generate(zoo, shape, prompt_len):
    prompt, ar, hf = zoo.greedy_refs(shape, prompt_len)
    assert type(zoo.pair(shape).hf).__name__ == "LlamaForCausalLM"
    assert len(ar) == N_NEW
    assert ar == hf


@pytest.mark.slow
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("method", ["tree", "chain"])
@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS, ids=lambda n: f"prompt{n}")
@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_speculative_equals_ar_and_transformers_generate(zoo, shape, prompt_len, method, depth):
    prompt, ar, hf = zoo.greedy_refs(shape, prompt_len)
    pair = zoo.pair(shape)
    for name, draft in pair.drafts.items():
        result = speculate(pair.target, draft, prompt, method, depth)
        assert result.token_ids == ar, f"draft={name}: speculative differs from AR"
        assert result.token_ids == hf, f"draft={name}: speculative differs from transformers generate"
        assert result.stats.finish_reason == "length"
        if name == "same":  # the draft is the target: whole paths are accepted, so the test exercises acceptance
            assert result.stats.tau > 1.5
            if method == "chain":
                assert result.stats.accept_lengths[:-1] == [depth + 1] * (len(result.stats.accept_lengths) - 1)
        if name == "noisy":
            assert result.stats.tau > 1.2


def test_greedy_speculative_accepts_paths_through_later_siblings(zoo, monkeypatch):
    """The noisy draft's tree often holds the target's token as a second or third child: those accepted paths move
    non-contiguous cache slots, and the output must still equal AR."""
    pair, (prompt, ar, _) = zoo.pair("gqa"), zoo.greedy_refs("gqa", 10)
    real_walk, later_sibling = generate_module.walk, []

    def recording_walk(tree, logits, sampling, generator=None):
        path, bonus = real_walk(tree, logits, sampling, generator)
        # Siblings sit in descending score order, so the first node with the same parent is the draft's favourite.
        later_sibling.extend(i != int((tree.parents == tree.parents[i]).nonzero()[0]) for i in path)
        return path, bonus

    monkeypatch.setattr(generate_module, "walk", recording_walk)
    result = speculate(pair.target, pair.drafts["noisy"], prompt, "tree", 6, max_new_tokens=40)
    ar40 = generate_ar(pair.target, prompt, Sampling(), 40).token_ids
    assert result.token_ids == ar40
    assert any(later_sibling), "no accepted node was a later sibling"


@pytest.mark.parametrize("method", ["tree", "chain"])
def test_drafter_cache_after_generation_equals_a_causal_prefill_of_the_committed_tokens(zoo, method):
    """Across cycles the drafter keeps exactly the accepted path's keys and values (moved into place)."""
    pair, (prompt, _, _) = zoo.pair("gqa"), zoo.greedy_refs("gqa", 10)
    draft = pair.drafts["noisy"]
    drafter = SmallLMDrafter(draft)
    cfg, policy = tree_method(method, 5)
    result = generate_speculative(pair.target, drafter, prompt, cfg, policy, Sampling(), 30)
    committed = prompt + result.token_ids
    # The last cycle may have accepted more than the budget kept: compare the committed part only.
    n = min(drafter.length, len(committed))
    assert n > len(prompt) + 20
    fresh = draft.new_cache(n, exact=False)  # the drafter keeps its cache in the draft's own dtype
    with torch.inference_mode():
        draft(torch.tensor([committed[:n]]), cache=fresh)
    torch.testing.assert_close(drafter.cache.k[:, :, :, :n], fresh.k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(drafter.cache.v[:, :, :, :n], fresh.v, atol=1e-4, rtol=1e-4)


def test_stats_account_for_every_cycle(zoo):
    pair, (prompt, ar, _) = zoo.pair("gqa"), zoo.greedy_refs("gqa", 10)
    depth = 4
    stats = speculate(pair.target, pair.drafts["noisy"], prompt, "tree", depth).stats
    cycles = len(stats.accept_lengths)
    assert stats.target_calls == cycles == len(stats.draft_calls_per_cycle)
    assert stats.draft_calls_per_cycle == [depth] * cycles and stats.draft_calls == depth * cycles
    assert stats.new_tokens == N_NEW <= sum(stats.accept_lengths) < N_NEW + depth + 1
    assert stats.tau == sum(stats.accept_lengths) / cycles and stats.prompt_tokens == len(prompt)
    ar_stats = generate_ar(pair.target, prompt, Sampling(), N_NEW).stats
    assert ar_stats.target_calls == N_NEW and ar_stats.tau == 1.0


@pytest.mark.parametrize("method", ["ar", "tree"])
def test_on_commit_sees_every_committed_token_in_order(zoo, method):
    pair, (prompt, ar, _) = zoo.pair("gqa"), zoo.greedy_refs("gqa", 10)
    seen: list[list[int]] = []
    if method == "ar":
        result = generate_ar(pair.target, prompt, Sampling(), N_NEW, on_commit=seen.append)
    else:
        cfg, policy = tree_method("tree", 4)
        result = generate_speculative(pair.target, SmallLMDrafter(pair.drafts["noisy"]), prompt, cfg, policy,
                                      Sampling(), N_NEW, on_commit=seen.append)
    assert [t for step in seen for t in step] == result.token_ids == ar
    assert len(seen) == result.stats.target_calls


@pytest.mark.parametrize("method", ["ar", "tree"])
def test_on_commit_returning_false_stops_after_that_step(zoo, method):
    pair, (prompt, ar, _) = zoo.pair("gqa"), zoo.greedy_refs("gqa", 10)
    steps: list[list[int]] = []

    def stop_after_two(tokens: list[int]) -> bool:
        steps.append(tokens)
        return len(steps) < 2

    if method == "ar":
        result = generate_ar(pair.target, prompt, Sampling(), N_NEW, on_commit=stop_after_two)
    else:
        cfg, policy = tree_method("tree", 4)
        result = generate_speculative(pair.target, SmallLMDrafter(pair.drafts["noisy"]), prompt, cfg, policy,
                                      Sampling(), N_NEW, on_commit=stop_after_two)
    assert result.stats.finish_reason == "stop" and len(steps) == 2
    assert result.token_ids == ar[: len(steps[0]) + len(steps[1])]


# ------------------------------------------------------------------------------------------------------- EOS


@pytest.mark.parametrize("draft", ["same", "noisy"])
@pytest.mark.parametrize("method", ["tree", "chain"])
def test_eos_inside_an_accepted_run_stops_there_like_ar_and_transformers(zoo, tmp_path, method, draft):
    depth = 4
    pair, (prompt, ar, _) = zoo.pair("gqa"), zoo.greedy_refs("gqa", 10)
    # The first token that is new to the output, at or after position 5, and not a cycle's bonus slot when the draft
    # accepts everything (cycles commit depth + 1 tokens, the last being the bonus).
    cut = next(i for i in range(5, N_NEW) if ar[i] not in ar[:i] and i % (depth + 1) != depth)
    eos = ar[cut]
    path = with_eos(pair.path, tmp_path / "eos", eos)
    target = Transformer.from_pretrained(path)
    assert target.config.eos_token_id == [eos]
    draft_model = target if draft == "same" else add_weight_noise(target, 0.05, seed=1)

    result = speculate(target, draft_model, prompt, method, depth)
    ar_eos = generate_ar(target, prompt, Sampling(), N_NEW)
    hf_eos = hf_greedy(load_hf_model(path), prompt, N_NEW, exact_length=False)

    assert result.token_ids == ar[: cut + 1] == ar_eos.token_ids == hf_eos
    assert result.stats.finish_reason == ar_eos.stats.finish_reason == "eos"
    if draft == "same":  # the EOS was a draft token with accepted tokens after it in the same cycle
        assert sum(result.stats.accept_lengths) > cut + 1


# ------------------------------------------------------------------------------------------ max_new_tokens


@pytest.mark.parametrize("depth, max_new_tokens", [(2, 7), (3, 10), (4, 6), (7, 17)])
@pytest.mark.parametrize("method", ["tree", "chain"])
def test_max_new_tokens_inside_an_accepted_run_gives_exactly_that_many_tokens(zoo, method, depth, max_new_tokens):
    assert max_new_tokens % (depth + 1)  # the budget ends inside a cycle's accepted run
    pair, (prompt, _, _) = zoo.pair("gqa"), zoo.greedy_refs("gqa", 10)
    result = speculate(pair.target, pair.target, prompt, method, depth, max_new_tokens=max_new_tokens)
    ar = generate_ar(pair.target, prompt, Sampling(), max_new_tokens)
    assert len(result.token_ids) == max_new_tokens == result.stats.new_tokens
    assert result.token_ids == ar.token_ids
    assert result.stats.finish_reason == "length"
    assert sum(result.stats.accept_lengths) > max_new_tokens  # the last cycle accepted more than was kept


# -------------------------------------------------------------------------------------------- context limit

CONTEXT = 32


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("ctx"), vocab=VOCAB, max_pos=CONTEXT, seed=0)
    return Transformer.from_pretrained(condition(path, logit_gain=4.0))


def run_both(model, prompt, max_new_tokens, method="tree", depth=4):
    """(AR result, speculative result with the model drafting for itself)."""
    return generate_ar(model, prompt, Sampling(), max_new_tokens), speculate(
        model, model, prompt, method, depth, max_new_tokens=max_new_tokens
    )


@pytest.mark.parametrize("prompt_len", [CONTEXT, CONTEXT + 5])
@pytest.mark.parametrize("which", ["ar", "speculative"])
def test_prompt_filling_the_context_raises_a_clear_error(short_context, which, prompt_len):
    prompt = prompt_ids(prompt_len)
    with pytest.raises(ValueError, match=rf"prompt of {prompt_len} tokens does not fit the model's context of {CONTEXT}"):
        if which == "ar":
            generate_ar(short_context, prompt, Sampling(), 4)
        else:
            speculate(short_context, short_context, prompt, "tree", 2, max_new_tokens=4)


@pytest.mark.parametrize("which", ["ar", "speculative"])
def test_empty_prompt_raises(short_context, which):
    with pytest.raises(ValueError, match="empty"):
        if which == "ar":
            generate_ar(short_context, [], Sampling(), 4)
        else:
            speculate(short_context, short_context, [], "tree", 2, max_new_tokens=4)


@pytest.mark.parametrize("max_new_tokens", [0, -3])
@pytest.mark.parametrize("which", ["ar", "speculative"])
def test_max_new_tokens_below_one_raises(short_context, which, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        if which == "ar":
            generate_ar(short_context, [1, 2], Sampling(), max_new_tokens)
        else:
            speculate(short_context, short_context, [1, 2], "tree", 2, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("method", ["tree", "chain"])
def test_request_longer_than_the_context_stops_at_the_context_with_reason_context(short_context, method):
    prompt = prompt_ids(20)
    ar, spec = run_both(short_context, prompt, 50, method)
    assert len(spec.token_ids) == CONTEXT - 20
    assert spec.token_ids == ar.token_ids
    assert spec.stats.finish_reason == ar.stats.finish_reason == "context"


def test_prompt_one_short_of_the_context_gives_one_token(short_context):
    ar, spec = run_both(short_context, prompt_ids(CONTEXT - 1), 8)
    assert spec.token_ids == ar.token_ids and len(ar.token_ids) == 1
    assert spec.stats.finish_reason == ar.stats.finish_reason == "context"


def test_request_that_exactly_fills_the_context_finishes_with_reason_length(short_context):
    ar, spec = run_both(short_context, prompt_ids(20), CONTEXT - 20)
    assert spec.token_ids == ar.token_ids and len(ar.token_ids) == CONTEXT - 20
    assert spec.stats.finish_reason == ar.stats.finish_reason == "length"


# ------------------------------------------------------------------------------------------ the decode session


def test_session_budget_is_the_request_cut_to_the_context(short_context):
    session = DecodeSession(short_context, prompt_ids(20), max_new_tokens=50)
    assert (session.budget, session.budget_reason, session.max_len) == (CONTEXT - 20, "context", CONTEXT)
    assert DecodeSession(short_context, prompt_ids(20), max_new_tokens=5).budget_reason == "length"


def test_session_commit_keeps_tokens_up_to_the_budget_and_streams_only_those(short_context):
    seen: list[list[int]] = []
    session = DecodeSession(short_context, [1, 2], max_new_tokens=3, on_commit=seen.append)
    assert session.commit([5, 6]) and session.root_position == 3
    assert not session.commit([7, 8, 9])
    result = session.result()
    assert result.token_ids == [5, 6, 7] and seen == [[5, 6], [7]]
    assert (result.stats.finish_reason, result.stats.new_tokens) == ("length", 3)


# -------------------------------------------------------------------------------------------- Method.parse


@pytest.mark.parametrize(
    "text, expected", [("ar", Method("ar")), ("chain:3", Method("chain", 3)), (" tree:12 ", Method("tree", 12)),
                       ("threshold:0.25", Method("threshold", threshold=0.25)), ("threshold:1.01", Method("threshold", threshold=1.01))]
)
def test_method_parse_reads_ar_chain_tree_and_threshold(text, expected):
    assert Method.parse(text) == expected
    assert Method.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["tree:0", "chain", "tree:-1", "beam:3", "", "threshold:-1", "threshold:",
                                  "threshold:x"])
def test_method_parse_rejects_anything_else(text):
    with pytest.raises(ValueError, match="unknown method"):
        Method.parse(text)


# ----------------------------------------------------------------------------------- sampling is lossless
#
# A vocabulary of 8, a 3-token prompt and 3 new tokens: the exact law of the 3 new tokens (512 sequences) is
# computed from the target's probabilities (transformers' logits, with a temperature and nucleus written here).
# The speculative decoder's N_RUNS samples are compared to it by chi-square tests on the law of the first token, of
# the first two and of all three (cells with fewer than 5 expected draws pooled into one; the short prefixes keep
# power where the 512-cell joint is thin). The draft is an independent model, so cycles both accept and reject.
# Every run uses a seeded generator, so outcomes are deterministic. With a correct sampler each p-value is below
# P_MIN / 3 with probability P_MIN / 3, so a test fails by chance with probability at most P_MIN = 1e-3 (Bonferroni);
# the two broken samplers below give p-values below 1e-9 with only half the samples.

SMALL = dict(vocab=8, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)
SMALL_PROMPT = [1, 2, 3]
SMALL_NEW = 3
N_RUNS = 1000
N_RUNS_BROKEN = 500  # the broken samplers are caught with half the samples
P_MIN = 1e-3


@dataclass
class SmallPair:
    target: Transformer
    draft: Transformer
    hf: torch.nn.Module


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    target = condition(make_tiny_llama(root, name="target", seed=0, **SMALL), logit_gain=2.0)
    draft = condition(make_tiny_llama(root, name="draft", seed=1, **SMALL), logit_gain=2.0)
    return SmallPair(Transformer.from_pretrained(target), Transformer.from_pretrained(draft), load_hf_model(target))


def reference_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """softmax(logits / T) cut to the smallest set of most likely tokens whose mass reaches top_p (per row)."""
    probs = torch.softmax(logits.double() / sampling.temperature, -1)
    if sampling.top_p < 1:
        out = torch.zeros_like(probs)
        for r in range(probs.shape[0]):
            mass = 0.0
            for i in probs[r].argsort(descending=True).tolist():
                out[r, i] = probs[r, i]
                mass += float(probs[r, i])
                if mass >= sampling.top_p:
                    break
        probs = out / out.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def exact_law(hf, sampling: Sampling) -> dict[tuple[int, ...], float]:
    """P(the first SMALL_NEW tokens = s) for every s, from the target's own next-token distributions."""
    vocab, n = SMALL["vocab"], len(SMALL_PROMPT)
    seqs = list(itertools.product(range(vocab), repeat=SMALL_NEW))
    ids = torch.tensor([SMALL_PROMPT + list(s) for s in seqs])
    logits = hf(input_ids=ids).logits
    law = {}
    rows = [reference_probs(logits[:, n - 1 + j], sampling) for j in range(SMALL_NEW)]
    for r, s in enumerate(seqs):
        law[s] = float(torch.prod(torch.stack([rows[j][r, s[j]] for j in range(SMALL_NEW)])))
    return law


def chi_square_p(counts: Counter, law: dict[tuple[int, ...], float]) -> float:
    """p-value of the observed sequences under `law`; outcomes of probability 0 must never be drawn."""
    impossible = {s: c for s, c in counts.items() if law.get(s, 0.0) == 0.0}
    assert not impossible, f"sampled sequences the target can never produce: {impossible}"
    n = sum(counts.values())
    big = [s for s, p in law.items() if p * n >= 5]
    small = [s for s, p in law.items() if 0 < p * n < 5]
    observed = [counts[s] for s in big] + [sum(counts[s] for s in small)]
    expected = [law[s] * n for s in big] + [sum(law[s] for s in small) * n]
    if expected[-1] < 5:  # too little pooled mass to be its own cell: fold it into the largest
        observed[0] += observed.pop()
        expected[0] += expected.pop()
    expected = [e * n / sum(expected) for e in expected]  # remove float drift so the sums agree exactly
    return float(chisquare(observed, expected).pvalue)


def marginal(law: dict[tuple[int, ...], float], length: int) -> dict[tuple[int, ...], float]:
    """The law (or counts) of the first `length` tokens."""
    out: dict[tuple[int, ...], float] = {}
    for seq, value in law.items():
        out[seq[:length]] = out.get(seq[:length], 0) + value
    return out


def prefix_p_values(counts: Counter, law: dict[tuple[int, ...], float]) -> list[float]:
    """Chi-square p-values of the first token, the first two, ..., all SMALL_NEW tokens."""
    return [chi_square_p(Counter(marginal(counts, j)), marginal(law, j)) for j in range(1, SMALL_NEW + 1)]


def sample_speculative(pair: SmallPair, method: str, sampling: Sampling, runs: int = N_RUNS) -> tuple[Counter, list[int]]:
    """Counts of the generated sequences over `runs` seeded runs, and every cycle's accept length."""
    gen = torch.Generator().manual_seed(0)
    counts, accept = Counter(), []
    cfg, policy = (TreeConfig(2, 2, 4), FixedDepth(2)) if method == "tree" else (TreeConfig(1, 2, 2), FixedDepth(2))
    for _ in range(runs):
        drafter = SmallLMDrafter(pair.draft)
        r = generate_speculative(pair.target, drafter, SMALL_PROMPT, cfg, policy, sampling, SMALL_NEW, gen)
        counts[tuple(r.token_ids)] += 1
        accept += r.stats.accept_lengths
    return counts, accept


SAMPLINGS = [
    ("tree", Sampling(1.0)),
    ("chain", Sampling(1.0)),
    ("tree", Sampling(0.7)),
    ("chain", Sampling(0.7)),
    ("tree", Sampling(1.0, top_p=0.8)),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, sampling", SAMPLINGS, ids=[f"{m}-T{s.temperature}-top_p{s.top_p}" for m, s in SAMPLINGS]
)
def test_sampled_speculative_matches_the_exact_target_distribution(small_pair, method, sampling):
    counts, accept = sample_speculative(small_pair, method, sampling)
    assert 1 in accept and max(accept) > 1, "the draft should be both rejected and accepted"
    assert min(prefix_p_values(counts, exact_law(small_pair.hf, sampling))) > P_MIN / SMALL_NEW


@pytest.mark.slow
def test_sampled_ar_matches_the_exact_target_distribution(small_pair):
    """The baseline, and a check of the reference itself."""
    sampling, gen, counts = Sampling(0.7, top_p=0.8), torch.Generator().manual_seed(0), Counter()
    for _ in range(N_RUNS):
        counts[tuple(generate_ar(small_pair.target, SMALL_PROMPT, sampling, SMALL_NEW, gen).token_ids)] += 1
    assert min(prefix_p_values(counts, exact_law(small_pair.hf, sampling))) > P_MIN / SMALL_NEW


def accept_the_draft_always(tree, logits, sampling, generator=None):
    """Broken: follow the best-scored child down to a leaf without asking the target, then sample the bonus."""
    children, path, node = tree.children(), [], -1
    while children[node]:
        node = max(children[node].values(), key=lambda c: float(tree.scores[c]))
        path.append(node)
    return path, next_token(logits[node + 1], sampling, generator)


def reject_without_renormalising(tree, logits, sampling, generator=None):
    """Broken: try each child x with probability p(x) but never renormalise p after a rejection, and draw the
    bonus from the untouched p (which can repeat a rejected child's token)."""
    children, path, node = tree.children(), [], -1
    while True:
        p = target_probs(logits[node + 1], sampling)
        for token, child in children[node].items():
            if float(torch.rand((), generator=generator)) < float(p[token]):
                path.append(child)
                node = child
                break
        else:
            return path, int(torch.multinomial(p, 1, generator=generator))


@pytest.mark.slow
@pytest.mark.parametrize("broken", [accept_the_draft_always, reject_without_renormalising], ids=lambda f: f.__name__)
def test_the_distribution_test_rejects_a_broken_sampler(small_pair, monkeypatch, broken):
    monkeypatch.setattr(generate_module, "walk", broken)
    sampling = Sampling(1.0)
    counts, _ = sample_speculative(small_pair, "tree", sampling, runs=N_RUNS_BROKEN)
    assert min(prefix_p_values(counts, exact_law(small_pair.hf, sampling))) < 1e-9


def test_sampled_speculative_is_reproducible_with_a_seeded_generator(small_pair):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        cfg, policy = TreeConfig(2, 2, 4), FixedDepth(2)
        drafter = SmallLMDrafter(small_pair.draft)
        return generate_speculative(small_pair.target, drafter, SMALL_PROMPT, cfg, policy, Sampling(1.0), 12, gen).token_ids

    assert run(5) == run(5)
    assert len({tuple(run(s)) for s in range(6)}) > 1
