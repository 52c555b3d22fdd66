"""Specification of radar.decoding.model: a Llama-family transformer with a tree-aware KV cache and HF checkpoint I/O.

Tolerances: against transformers (a different implementation, eager attention) fp32 logits agree within
atol=rtol=1e-4; our own model against itself (cache vs. no cache, tree vs. sequential) agrees within 1e-5.
Every checkpoint is a tiny random-init HF model from tests/tiny_models.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import hf_config, hf_logits, load_hf_model, make_tiny_llama, random_ids

from radar.decoding.model import KVCache, ModelConfig, ModelLoadError, Transformer

HF_TOL = dict(atol=1e-4, rtol=1e-4)  # ours vs. transformers, fp32
SELF_TOL = dict(atol=1e-5, rtol=1e-5)  # ours vs. ours along a different code path, fp32

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# A tree of 6 draft tokens after the prefix; -1 = child of the last prefix token.
#   prefix ─┬─ 0 ─┬─ 2
#           │     └─ 3 ── 5
#           └─ 1 ──── 4
TREE_PARENTS = [-1, -1, 0, 0, 1, 3]


def tree_ancestry(parents: list[int]) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """(Q, Q) ancestor-or-self mask, each node's depth, and each node's root-to-node path."""
    paths = []
    for i, p in enumerate(parents):
        assert p < i, "parents must come before children"
        paths.append(([] if p == -1 else paths[p]) + [i])
    q = len(parents)
    mask = torch.zeros(q, q, dtype=torch.bool)
    for i, path in enumerate(paths):
        mask[i, path] = True
    return mask, [len(path) - 1 for path in paths], paths


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A GQA Llama checkpoint (4 query heads, 2 KV heads) shared by the cache and tree tests."""
    return make_tiny_llama(tmp_path_factory.mktemp("ckpt"), layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def model(ckpt):
    return Transformer.from_pretrained(ckpt)


def full_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# ------------------------------------------------------------------------------------- parity with transformers

PARITY_CASES = {
    "gqa": (dict(heads=4, kv_heads=2), 40),
    "multi_head": (dict(heads=4, kv_heads=4), 40),
    "multi_query": (dict(heads=4, kv_heads=1), 40),
    "explicit_head_dim": (dict(heads=4, kv_heads=2, head_dim=32), 40),
    "tied_embeddings": (dict(tie=True), 40),
    # head_dim 16, theta 1e4: wavelengths 6.3 | 19.9 | 63 ... hit the kept, interpolated and slowed bands of (8, 32)
    "llama3_rope_scaling": (dict(rope_scaling=LLAMA3_ROPE), 96),  # longer than the 32 original positions
    "linear_rope_scaling": (dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), 96),
    "rope_theta_500k": (dict(rope_theta=500000.0), 40),
    "llama_attention_bias": (dict(attention_bias=True), 40),
    "qwen2_qkv_bias": (dict(model_type="qwen2"), 40),
    "mistral": (dict(model_type="mistral"), 40),
}


@pytest.mark.parametrize("kwargs, seq_len", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_logits_match_transformers(tmp_path, kwargs, seq_len):
    path = make_tiny_llama(tmp_path, **kwargs)
    ids = random_ids(seq_len, batch=2)
    ours = full_logits(Transformer.from_pretrained(path), ids)
    torch.testing.assert_close(ours, hf_logits(path, ids), **HF_TOL)


def test_qwen2_has_bias_on_qkv_but_not_on_output_projection(tmp_path):
    model = Transformer.from_pretrained(make_tiny_llama(tmp_path, model_type="qwen2"))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


# ---------------------------------------------------------------------------------------------------- KV cache


def test_prefill_then_one_token_at_a_time_matches_full_forward(model):
    ids = random_ids(24, seed=1)
    expected = full_logits(model, ids)
    cache = model.new_cache(32)
    with torch.no_grad():
        steps = [model(ids[:, :10], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **SELF_TOL)


def test_prefill_then_uneven_chunks_matches_full_forward(model):
    ids = random_ids(24, seed=2)
    expected = full_logits(model, ids)
    cache = model.new_cache(24)  # exactly full at the end
    bounds = [0, 7, 10, 15, 16, 24]
    with torch.no_grad():
        chunks = [model(ids[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, **SELF_TOL)


def test_cache_works_for_a_batch_of_sequences(model):
    ids = random_ids(16, batch=3, seed=3)
    expected = full_logits(model, ids)
    cache = model.new_cache(16, batch=3)
    with torch.no_grad():
        out = torch.cat([model(ids[:, a:b], cache=cache) for a, b in [(0, 9), (9, 12), (12, 16)]], dim=1)
    torch.testing.assert_close(out, expected, **SELF_TOL)


def test_last_only_returns_just_the_final_positions_logits(model):
    ids = random_ids(12, seed=4)
    with torch.no_grad():
        last = model(ids, last_only=True)
    assert last.shape == (1, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full_logits(model, ids)[:, -1:], **SELF_TOL)


def test_cache_overflow_raises_and_leaves_the_cache_unchanged(model):
    cache = model.new_cache(8)
    with torch.no_grad():
        model(random_ids(6), cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            model(random_ids(3), cache=cache)
    assert cache.length == 6


def test_new_cache_matches_the_model_layout(model):
    cache = model.new_cache(20, batch=2, exact=False)
    cfg = model.config
    assert cache.k.shape == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 20, cfg.head_dim)
    assert cache.k.dtype == model.dtype and cache.v.shape == cache.k.shape
    assert cache.length == 0 and cache.max_len == 20


def test_a_cpu_cache_is_exact_by_default_so_attention_runs_in_float64(ckpt):
    bf16 = Transformer.from_pretrained(ckpt, dtype=torch.bfloat16)
    cache = bf16.new_cache(8)
    assert cache.k.dtype == cache.v.dtype == torch.float64
    with torch.no_grad():
        logits = bf16(random_ids(4, seed=3), cache=cache)
    assert logits.dtype == torch.bfloat16  # only attention is widened; the model's activations stay bf16


def test_tree_nodes_get_the_bits_they_get_decoded_alone_in_bfloat16(tmp_path):
    """The property lossless bf16 speculation rests on: a tree node's logits (its parent at another slot, masked
    siblings between) equal bit for bit those of the same token decoded after its path one token at a time. (With
    `exact=False`, a bf16 cache, torch 2.13's CPU attention sums in another order and all ten seeds tried differ.)"""
    bf16 = Transformer.from_pretrained(make_tiny_llama(tmp_path, hidden=256, heads=4, kv_heads=2, layers=2),
                                       dtype=torch.bfloat16)
    n, depth = 60, 6
    prefix, toks = random_ids(n, seed=1), random_ids(2 * depth, seed=2)[0].tolist()
    chain, siblings = toks[:depth], toks[depth:]
    ids = [t for pair in zip(chain, siblings) for t in pair]  # chain node i at 2i, a dead-end sibling at 2i + 1
    parent = [2 * (i // 2 - 1) if i >= 2 else -1 for i in range(2 * depth)]
    mask = torch.eye(2 * depth, dtype=torch.bool)
    for j in range(2 * depth):
        p = parent[j]
        while p >= 0:
            mask[j, p], p = True, parent[p]
    with torch.no_grad():
        alone = bf16.new_cache(n + depth)
        bf16(prefix, cache=alone)
        path = torch.stack([bf16(torch.tensor([[t]]), cache=alone)[0, -1] for t in chain])
        tree = bf16.new_cache(n + 2 * depth)
        bf16(prefix, cache=tree)
        positions = torch.tensor([[n + i // 2 for i in range(2 * depth)]])
        verified = bf16(torch.tensor([ids]), position_ids=positions, cache=tree, tree_mask=mask)[0, 0::2]
    assert torch.equal(verified, path)


def test_bfloat16_loading_gives_bfloat16_weights_and_logits_close_to_fp32(ckpt, model):
    bf16 = Transformer.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = random_ids(32, seed=14)
    ours, ref = full_logits(bf16, ids), full_logits(model, ids)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, atol=0.1, rtol=0.05)  # bf16 keeps ~3 significant digits


def test_bfloat16_cache_decoding_matches_bfloat16_full_forward(ckpt):
    bf16 = Transformer.from_pretrained(ckpt, dtype=torch.bfloat16)
    ids = random_ids(20, seed=15)
    cache = bf16.new_cache(20, exact=False)
    assert cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        steps = [bf16(ids[:, :12], cache=cache)] + [bf16(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), full_logits(bf16, ids).float(), atol=0.05, rtol=0.02)
