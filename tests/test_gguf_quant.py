"""The gguf precision: GGUF blocks decoded exactly, the int4 kernel computing with them, a tiny GGUF model (tiny_gguf.py)
close to its dequantized float32 twin, and speculation on it lossless against AR on the same quantized weights."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from test_generate import P_MIN, SMALL_NEW, SMALL_PROMPT, condition, prefix_p_values, reference_probs
from tiny_gguf import random_llama_state, write_gguf
from tiny_models import make_tiny_llama

from radar.decoding import pair as pair_module
from radar.decoding.drafters import SmallLMDrafter
from radar.decoding.generate import generate_speculative
from radar.decoding.gguf_quant import (GGUF_FILE, Blocks, GGUFLayoutError, Int4Linear, build_quantized, decode_blocks,
                                       load_gguf_model, quantize_blocks)
from radar.decoding.model import ModelLoadError, Transformer
from radar.decoding.pair import ModelPair, precision_of, resolve_precision
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import TreeConfig
from radar.decoding.verify import Sampling
from radar.ops.gguf_convert import convert_gguf

IDS = torch.tensor([[1, 70, 200, 265, 3, 99, 140, 7, 260, 31, 2, 150]])


def blocks_of(w: np.ndarray, kind: Q) -> Blocks:
    return decode_blocks(kind.name, quantize(w, kind))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def gguf_dir(request, tmp_path_factory):
    """A checkpoint converted from a tiny llama.cpp-style GGUF (Q4_1 and Q8_0 tensors) that keeps the GGUF."""
    folder = tmp_path_factory.mktemp("gguf")
    gguf = write_gguf(random_llama_state(tied=request.param), folder / "tiny.gguf")
    out = convert_gguf(gguf, folder / "hf")
    shutil.copyfile(gguf, out / GGUF_FILE)
    return out


# --------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda k: k.name)
def test_blocks_decode_to_exactly_what_gguf_dequantizes(kind):
    w = np.random.default_rng(0).normal(size=(8, 96)).astype(np.float32)
    raw = quantize(w, kind)
    assert torch.equal(decode_blocks(kind.name, raw).dequantize(), torch.from_numpy(dequantize(raw, kind)))


def test_a_block_kind_without_a_kernel_is_refused_by_name():
    raw = quantize(np.ones((2, 32), dtype=np.float32), Q.Q5_1)
    with pytest.raises(GGUFLayoutError, match="Q5_1 are not supported"):
        decode_blocks("Q5_1", raw)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda k: k.name)
def test_int4_linear_computes_with_the_dequantized_weights(kind):
    # 40 rows: not a multiple of the 16 the kernel packs, so the padding is exercised too.
    w = np.random.default_rng(1).normal(size=(40, 64)).astype(np.float32)
    blocks = blocks_of(w, kind)
    x = torch.randn(5, 64).bfloat16()
    reference = x.float() @ blocks.dequantize().T
    out = Int4Linear(blocks)(x).float()
    # bf16 scales and outputs: within a few bf16 steps of the float32 product.
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q8_0], ids=lambda k: k.name)
def test_a_row_gets_the_same_bits_whatever_the_batch(kind):
    # The premise of lossless speculation on the int4 kernel: verifying a tree row by row or together is the same.
    layer = Int4Linear(blocks_of(np.random.default_rng(2).normal(size=(48, 128)).astype(np.float32), kind))
    x = torch.randn(1, 13, 128).bfloat16()[0]
    together = layer(x)
    assert all(torch.equal(layer(x[:m]), together[:m]) for m in range(1, 14))


def test_quantized_blocks_keep_every_weight_within_half_a_level():
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(4)) * 0.3
    blocks = quantize_blocks(w)
    assert blocks.q.dtype == torch.int8 and blocks.zero is None
    level = blocks.scale.repeat_interleave(32, dim=1)
    assert bool(((blocks.dequantize() - w).abs() <= 0.5 * level + 1e-7).all())
    assert bool((blocks.q.abs().amax(-1) >= 126).all())  # each block's largest weight uses the whole int8 range


def test_a_matrix_of_a_partial_block_is_refused_for_quantization():
    with pytest.raises(GGUFLayoutError, match="multiple of 32 columns"):
        quantize_blocks(torch.ones(4, 40))


# ---------------------------------------------------------------------------------------------------- model


def test_gguf_model_is_close_to_its_dequantized_float32_twin(gguf_dir):
    with torch.no_grad():
        quantized = load_gguf_model(gguf_dir)(IDS).float()
        reference = Transformer.from_pretrained(gguf_dir)(IDS).float()
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_gguf_model_keeps_its_linear_layers_as_int4_blocks(gguf_dir):
    model = load_gguf_model(gguf_dir)
    assert model.quantized and precision_of(model) == "gguf"
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear) and isinstance(model.lm_head, Int4Linear)
    assert not any(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("method", ["chain:3", "tree:3"])
def test_greedy_speculation_on_the_gguf_target_equals_its_ar(gguf_dir, method):
    pair = ModelPair.load(gguf_dir, gguf_dir, device="cpu", dtype="gguf")  # the float twin as a small-LM draft
    for prompt in ([1, 70, 200], [5, 9, 31, 77, 140], [260, 3]):
        ar = pair.generate(prompt, "ar", max_new_tokens=24).token_ids
        spec = pair.generate(prompt, method, max_new_tokens=24)
        assert spec.token_ids == ar
        assert spec.stats.target_calls < 24  # the draft was accepted somewhere: a real speculative run


SMALL_Q = dict(vocab=8, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)  # int4 groups need 32 columns


def test_a_tied_model_with_a_float_embedding_shares_it_with_the_output(tmp_path):
    model = Transformer.from_pretrained(make_tiny_llama(tmp_path, seed=3, tie=True, **SMALL_Q))
    weights = {k: torch.from_numpy(v.float().numpy()) if v.ndim == 1 or "embed" in k else
               blocks_of(v.float().numpy(), Q.Q4_1) for k, v in model.state_dict().items()}
    quantized = build_quantized(model.config, weights)
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    with torch.no_grad():
        out, reference = quantized(IDS % SMALL_Q["vocab"]).float(), model(IDS % SMALL_Q["vocab"])
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


def test_an_eagle3_head_drafts_losslessly_over_a_gguf_target_and_saves_without_its_embedding(gguf_dir, tmp_path):
    from tiny_models import make_tiny_eagle3

    from radar.decoding.eagle3 import Eagle3Head

    pair = ModelPair.load(gguf_dir, device="cpu", dtype="gguf")
    make_tiny_eagle3(Transformer.from_pretrained(gguf_dir), draft_vocab=64).save_pretrained(tmp_path / "head")
    pair.draft = Eagle3Head.from_pretrained(tmp_path / "head").bind(pair.target)  # float32 beside bf16 features
    for prompt in ([1, 70, 200], [5, 9, 31, 77, 140]):
        ar = pair.generate(prompt, "ar", max_new_tokens=16).token_ids
        assert pair.generate(prompt, "chain:2", max_new_tokens=16).token_ids == ar
        assert pair.generate(prompt, "tree:2", max_new_tokens=16).token_ids == ar
    pair.draft.save_pretrained(tmp_path / "again")
    assert Eagle3Head.from_pretrained(tmp_path / "again").embed_tokens is None


def test_an_eagle3_head_loaded_beside_a_gguf_target_drafts_on_the_int4_kernel_losslessly(gguf_dir, tmp_path):
    from tiny_models import make_tiny_eagle3

    from radar.decoding.eagle3 import Eagle3Head

    float_head = make_tiny_eagle3(Transformer.from_pretrained(gguf_dir), draft_vocab=64)
    float_head.save_pretrained(tmp_path / "head")
    pair = ModelPair.load(gguf_dir, tmp_path / "head", device="cpu", dtype="gguf")
    assert isinstance(pair.draft.lm_head, Int4Linear) and isinstance(pair.draft.midlayer.mlp.down_proj, Int4Linear)
    assert pair.draft.dtype == torch.bfloat16
    for prompt in ([1, 70, 200], [5, 9, 31, 77, 140]):
        ar = pair.generate(prompt, "ar", max_new_tokens=16).token_ids
        assert pair.generate(prompt, "tree:2", max_new_tokens=16).token_ids == ar
    # It proposes what the float head proposes: the same inputs give nearly the same draft logits.
    float_head.bind(pair.target)
    ids, positions = IDS[:, :8], torch.arange(8)[None]
    features = torch.randn(1, 8, float_head.fc.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = float_head(ids, float_head.project(features), positions)[0]
        quantized = pair.draft(ids, pair.draft.project(features), positions)[0].float()
    assert (quantized - reference).abs().max() < 0.03 * reference.abs().max()
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="save the float head"):
        pair.draft.save_pretrained(tmp_path / "again")


def test_loading_a_head_beside_a_gguf_target_leaves_the_target_and_the_heads_rope_as_they_are(gguf_dir, tmp_path):
    from tiny_models import make_tiny_eagle3

    make_tiny_eagle3(Transformer.from_pretrained(gguf_dir), draft_vocab=64).save_pretrained(tmp_path / "head")
    alone = ModelPair.load(gguf_dir, None, device="cpu", dtype="gguf").target
    pair = ModelPair.load(gguf_dir, tmp_path / "head", device="cpu", dtype="gguf")
    assert pair.draft.inv_freq.dtype == torch.float32
    for (name, a), (_, b) in zip(alone.state_dict().items(), pair.target.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(alone(IDS[:, :8]), pair.target(IDS[:, :8]))


def quantized_twin(model: Transformer) -> Transformer:
    """`model` with its linear layers quantized to Q4_1 and its embedding to Q8_0, as a GGUF would hold them."""
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    weights = {k: torch.from_numpy(v) if v.ndim == 1 else blocks_of(v, Q.Q8_0 if "embed" in k else Q.Q4_1)
               for k, v in state.items()}
    return build_quantized(model.config, weights)


@pytest.mark.slow
def test_sampled_speculation_on_the_gguf_target_follows_its_exact_distribution(tmp_path):
    checkpoint = {name: condition(make_tiny_llama(tmp_path, name=name, seed=seed, **SMALL_Q), logit_gain=2.0)
                  for name, seed in (("target", 0), ("draft", 1))}
    target = quantized_twin(Transformer.from_pretrained(checkpoint["target"]))
    draft = Transformer.from_pretrained(checkpoint["draft"], dtype=torch.bfloat16)
    sampling = Sampling(1.0)
    seqs = list(itertools.product(range(SMALL_Q["vocab"]), repeat=SMALL_NEW))
    with torch.no_grad():
        logits = target(torch.tensor([SMALL_PROMPT + list(s) for s in seqs])).float()
    n = len(SMALL_PROMPT)
    rows = [reference_probs(logits[:, n - 1 + j], sampling) for j in range(SMALL_NEW)]
    law = {s: float(np.prod([rows[j][r, s[j]] for j in range(SMALL_NEW)])) for r, s in enumerate(seqs)}
    gen, counts, accepted = torch.Generator().manual_seed(0), Counter(), []
    for _ in range(1000):
        r = generate_speculative(target, SmallLMDrafter(draft), SMALL_PROMPT, TreeConfig(2, 2, 3), FixedDepth(2),
                                 sampling, SMALL_NEW, gen)
        counts[tuple(r.token_ids)] += 1
        accepted += r.stats.accept_lengths
    assert max(accepted) > 1
    assert min(prefix_p_values(counts, law)) > P_MIN / SMALL_NEW


# ------------------------------------------------------------------------------------------- precision choice


def test_gguf_precision_without_the_gguf_file_names_the_fix(gguf_dir, tmp_path):
    plain = shutil.copytree(gguf_dir, tmp_path / "plain", ignore=shutil.ignore_patterns(GGUF_FILE))
    with pytest.raises(ModelLoadError, match="has no model.gguf.*radar models fetch"):
        ModelPair.load(plain, device="cpu", dtype="gguf")


def test_gguf_precision_refuses_a_gpu_device(gguf_dir):
    with pytest.raises(ModelLoadError, match="CPU's int4 kernel only: pass --device cpu"):
        load_gguf_model(gguf_dir, "cuda")


def test_auto_precision_is_gguf_on_a_bf16_cpu_when_the_checkpoint_keeps_its_gguf(gguf_dir, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(pair_module, "native_bf16", lambda: True)
    assert resolve_precision("auto", cpu, gguf_dir) == "gguf"
    assert resolve_precision("auto", cpu, tmp_path) == "bfloat16"
    monkeypatch.setattr(pair_module, "native_bf16", lambda: False)
    assert resolve_precision("auto", cpu, gguf_dir) == "float32"  # the int4 path computes in bf16: slow there


def test_generate_runs_the_gguf_precision_and_keeps_dtype_as_its_old_name(gguf_dir):
    from typer.testing import CliRunner

    from radar.cli.app import app

    common = ["generate", "--model", str(gguf_dir), "--draft", str(gguf_dir), "--prompt", "item 12",
              "--max-new-tokens", "10", "--json", "--raw"]
    runs = [CliRunner().invoke(app, [*common, "--method", method, flag, "gguf"])
            for method, flag in (("ar", "--precision"), ("chain:2", "--precision"), ("chain:2", "--dtype"))]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    assert len({tuple(json.loads(r.stdout)["token_ids"]) for r in runs}) == 1


def test_generate_defaults_to_chain_1_on_a_gguf_target(gguf_dir):
    from typer.testing import CliRunner

    from radar.cli.app import app

    result = CliRunner().invoke(app, ["generate", "--model", str(gguf_dir), "--draft", str(gguf_dir), "--prompt",
                                      "item", "--max-new-tokens", "4", "--json", "--precision", "gguf"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "chain:1"


def test_gguf_precision_picks_the_small_verification_budget(gguf_dir):
    tree = ModelPair.load(gguf_dir, device="cpu", dtype="gguf").tree
    assert (tree.total_tokens, tree.max_calls) == (3, 3)  # a 4th call's nodes could never be verified
    assert ModelPair.load(gguf_dir, device="cpu", dtype="float32").tree.total_tokens == 12
