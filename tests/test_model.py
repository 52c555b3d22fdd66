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


# ------------------------------------------------------------------------------------------ tree verification


def run_tree(model: Transformer, prefix: torch.Tensor, tree_tokens: torch.Tensor, parents: list[int]):
    """Prefill `prefix`, then feed the whole draft tree in one forward; returns (tree logits (Q, V), cache)."""
    mask, depth, _ = tree_ancestry(parents)
    cache = model.new_cache(prefix.shape[1] + len(parents) + 4)
    with torch.no_grad():
        model(prefix, cache=cache)
        pos = (prefix.shape[1] + torch.tensor(depth))[None]
        logits = model(tree_tokens[None], position_ids=pos, cache=cache, tree_mask=mask)
    return logits[0], cache


def test_tree_ancestry_helper_reads_parents_as_specified():
    mask, depth, paths = tree_ancestry(TREE_PARENTS)
    assert depth == [0, 0, 1, 1, 1, 2]
    assert paths[5] == [0, 3, 5] and paths[4] == [1, 4]
    assert mask[5].nonzero().flatten().tolist() == [0, 3, 5]


def test_each_tree_node_gets_the_logits_of_its_sequential_path(model):
    prefix = random_ids(10, seed=5)
    tree_tokens = random_ids(len(TREE_PARENTS), seed=6)[0]
    tree_logits, cache = run_tree(model, prefix, tree_tokens, TREE_PARENTS)
    assert cache.length == 10 + len(TREE_PARENTS)
    for node, path in enumerate(tree_ancestry(TREE_PARENTS)[2]):
        sequential = full_logits(model, torch.cat([prefix, tree_tokens[path][None]], dim=1))[0, -1]
        torch.testing.assert_close(tree_logits[node], sequential, **SELF_TOL, msg=f"node {node}, path {path}")


def test_a_chain_shaped_tree_equals_causal_decoding(model):
    prefix, chain = random_ids(8, seed=7), random_ids(5, seed=8)[0]
    tree_logits, _ = run_tree(model, prefix, chain, [-1, 0, 1, 2, 3])
    torch.testing.assert_close(tree_logits, full_logits(model, torch.cat([prefix, chain[None]], 1))[0, 8:], **SELF_TOL)


@pytest.mark.parametrize("path", [[0, 3, 5], [1, 4], [0, 2], [1], []], ids=str)
def test_keep_accepted_path_then_next_token_matches_sequential_run(model, path):
    prefix = random_ids(10, seed=9)
    tree_tokens = random_ids(len(TREE_PARENTS), seed=10)[0]
    _, cache = run_tree(model, prefix, tree_tokens, TREE_PARENTS)

    cache.keep(10, [10 + node for node in path])
    assert cache.length == 10 + len(path)
    nxt = torch.tensor([[17]])
    with torch.no_grad():
        logits = model(nxt, cache=cache)  # default position = slot = 10 + len(path)

    sequential = full_logits(model, torch.cat([prefix, tree_tokens[path][None], nxt], dim=1))[:, -1:]
    torch.testing.assert_close(logits, sequential, **SELF_TOL)


def test_two_rounds_of_tree_verification_match_sequential_decoding(model):
    prefix = random_ids(6, seed=11)
    tokens_1, tokens_2 = random_ids(6, seed=12)[0], random_ids(6, seed=13)[0]
    mask, depth, paths = tree_ancestry(TREE_PARENTS)
    cache = model.new_cache(40)
    with torch.no_grad():
        model(prefix, cache=cache)
        model(tokens_1[None], position_ids=(6 + torch.tensor(depth))[None], cache=cache, tree_mask=mask)
        cache.keep(6, [6 + n for n in paths[5]])  # accept 0 -> 3 -> 5
        start = cache.length
        round_2 = model(tokens_2[None], position_ids=(start + torch.tensor(depth))[None], cache=cache, tree_mask=mask)[0]
    committed = torch.cat([prefix[0], tokens_1[paths[5]]])
    for node, path in enumerate(paths):
        sequential = full_logits(model, torch.cat([committed, tokens_2[path]])[None])[0, -1]
        torch.testing.assert_close(round_2[node], sequential, **SELF_TOL, msg=f"round 2, node {node}")


def test_keep_moves_the_chosen_slots_down_in_order_and_keeps_the_prefix():
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    cache = KVCache(cfg, max_len=10)
    slot_ids = torch.arange(10, dtype=torch.float32)[None, None, None, :, None]
    cache.k[:] = slot_ids
    cache.v[:] = -slot_ids
    cache.length = 9
    cache.keep(4, [7, 5, 8])  # overlapping source and destination ranges
    assert cache.length == 7
    assert cache.k[1, 0, 0, :7, 0].tolist() == [0, 1, 2, 3, 7, 5, 8]
    assert cache.v[0, 0, 0, :7, 0].tolist() == [-0.0, -1, -2, -3, -7, -5, -8]


# -------------------------------------------------------------------------------------------- save and load


ROUND_TRIP_CASES = {
    "untied": dict(eos=[2, 3], bos=1),
    "tied_embeddings": dict(tie=True, eos=2),
    "llama3_rope_scaling": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama_attention_bias": dict(attention_bias=True),
    "qwen2": dict(model_type="qwen2"),
}


@pytest.mark.parametrize("kwargs", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_save_then_load_round_trips_weights_config_and_logits(tmp_path, kwargs):
    original = Transformer.from_pretrained(make_tiny_llama(tmp_path, **kwargs))
    original.save_pretrained(tmp_path / "ours")
    reloaded = Transformer.from_pretrained(tmp_path / "ours")
    assert reloaded.config == original.config
    ids = random_ids(40)
    torch.testing.assert_close(full_logits(reloaded, ids), full_logits(original, ids), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_transformers_loads_what_we_save(tmp_path, kwargs):
    ours = Transformer.from_pretrained(make_tiny_llama(tmp_path, **kwargs))
    ours.save_pretrained(tmp_path / "ours")
    hf = load_hf_model(tmp_path / "ours")
    assert hf.config.tie_word_embeddings == ours.config.tie_word_embeddings
    ids = random_ids(40, batch=2)
    torch.testing.assert_close(hf_logits(hf, ids), full_logits(ours, ids), **HF_TOL)


def test_a_freshly_initialised_model_saves_a_checkpoint_transformers_loads(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=[5])
    ours = Transformer(cfg).eval()
    ours.save_pretrained(tmp_path / "fresh")
    ids = random_ids(20, vocab=64)
    torch.testing.assert_close(hf_logits(tmp_path / "fresh", ids), full_logits(ours, ids), **HF_TOL)
    assert Transformer.from_pretrained(tmp_path / "fresh").config == cfg


def test_saving_leaves_the_model_config_unchanged(tmp_path):
    model = Transformer.from_pretrained(make_tiny_llama(tmp_path, rope_scaling=LLAMA3_ROPE, eos=[2, 3]))
    before = copy.deepcopy(model.config)
    model.save_pretrained(tmp_path / "ours")
    assert model.config == before


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    model = Transformer.from_pretrained(make_tiny_llama(tmp_path, tie=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_embeddings_load_separately(tmp_path):
    model = Transformer.from_pretrained(make_tiny_llama(tmp_path, tie=False))
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_sharded_checkpoint_loads(tmp_path):
    path = make_tiny_llama(tmp_path, max_shard_size="50KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected the checkpoint to be split into several shards"
    assert not (path / "model.safetensors").exists()
    ids = random_ids(30, batch=2)
    torch.testing.assert_close(full_logits(Transformer.from_pretrained(path), ids), hf_logits(path, ids), **HF_TOL)


def test_config_reads_eos_bos_and_rope_settings(tmp_path):
    path = make_tiny_llama(tmp_path, eos=[2, 7], bos=1, rope_scaling=LLAMA3_ROPE, rope_theta=5e5)
    cfg = Transformer.from_pretrained(path).config
    assert cfg.eos_token_id == [2, 7] and cfg.bos_token_id == 1
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling == LLAMA3_ROPE


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_directory_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_directory_without_config_json_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)


def test_unreadable_config_json_raises_model_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not be read"):
        Transformer.from_pretrained(tmp_path)


def test_non_llama_model_type_raises_model_load_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'gpt2' is not a Llama-family"):
        Transformer.from_pretrained(tmp_path)


def test_model_load_error_is_a_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_config_without_safetensors_raises_model_load_error(tmp_path):
    hf_config().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_weights_missing_for_the_config_raise_model_load_error(tmp_path):
    path = make_tiny_llama(tmp_path, layers=2)
    _edit_config(path, num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match=r"do not match the config.*missing.*layers\.2\."):
        Transformer.from_pretrained(path)


def test_unexpected_weights_for_the_config_raise_model_load_error(tmp_path):
    path = make_tiny_llama(tmp_path, layers=2)
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match=r"do not match the config.*unexpected.*layers\.1\."):
        Transformer.from_pretrained(path)


def test_weight_shapes_that_disagree_with_the_config_raise_model_load_error(tmp_path):
    path = make_tiny_llama(tmp_path, intermediate=128)
    _edit_config(path, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"do not match the config.*mlp"):
        Transformer.from_pretrained(path)


def test_unsupported_rope_scaling_raises_model_load_error(tmp_path):
    path = make_tiny_llama(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ModelLoadError, match="'dynamic' is not supported"):
        Transformer.from_pretrained(path)


def test_sharded_index_naming_a_missing_shard_raises_an_error_naming_the_shard(tmp_path):
    path = make_tiny_llama(tmp_path, max_shard_size="50KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (path / shard).unlink()
    with pytest.raises((ModelLoadError, FileNotFoundError), match=shard):
        Transformer.from_pretrained(path)


# --------------------------------------------------------------------------------------------------- bfloat16


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
