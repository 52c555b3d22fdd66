"""Specification of radar.ops.demo_pair: the reproducible demo target + draft pair, on a tiny config.

A tiny build (small corpus cap, 64-wide models, a few steps) takes a few seconds; the session fixture builds it
once through `ensure_demo_pair` and the determinism test builds it a second time with `build_demo_pair`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from radar.decoding.model import Transformer
from radar.ops import demo_pair as demo_models
from radar.ops.demo_pair import build as demo_build
from radar.ops.demo_pair import DemoConfig, build_demo_pair, default_demo_dir, ensure_demo_pair

TINY = DemoConfig(
    threads=1,
    max_corpus_chars=120_000,
    math_problems=40,
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=2,
    num_key_value_heads=2,
    target_layers=2,
    max_position_embeddings=256,
    seq_len=64,
    batch_size=4,
    target_steps=6,
    draft_steps=4,
    warmup_steps=2,
    onpolicy_prompt_tokens=16,
    eval_batches=1,
    eval_new_tokens=16,
)
CODE = 'def add(a, b):\n    """Return a + b."""\n    return a  +  b\n\n\tx = [1, 2]  # tab\n'


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("radar") / "demo"
    target, draft = ensure_demo_pair(TINY, out_dir=out, progress=False)
    return out, target, draft


def test_pair_layout_and_manifest(tiny_demo):
    out, target, draft = tiny_demo
    assert (target, draft) == (out / "target", out / "draft")
    for d in (target, draft):
        for f in demo_models.MODEL_FILES:
            assert (d / f).is_file(), f"{d / f} missing"
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["config"]["seed"] == TINY.seed
    assert manifest["corpus"]["train_tokens"] > 0
    assert manifest["params"]["draft"] < manifest["params"]["target"]
    assert {"target_train_ce", "draft_train_kl"} <= set(manifest["final_losses"])
    assert 0 <= manifest["metrics"]["heldout"]["top1"] <= 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary build directories left over"


def test_build_is_deterministic(tiny_demo, tmp_path):
    out, target, draft = tiny_demo
    target2, draft2 = build_demo_pair(tmp_path, TINY, progress=False)
    for a, b in ((target, target2), (draft, draft2)):
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
        assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_loads_with_transformers_and_ours(tiny_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    _, target, draft = tiny_demo
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    for d in (target, draft):
        tok = AutoTokenizer.from_pretrained(d)
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
        ours = Transformer.from_pretrained(d)
        assert ours.config.bos_token_id == tok.bos_token_id
        assert ours.config.eos_token_id == [tok.eos_token_id]
        assert len(tok) == ours.config.vocab_size == TINY.vocab_size
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        assert hf.config.eos_token_id == tok.eos_token_id
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_round_trips_and_adds_bos(tiny_demo):
    from transformers import AutoTokenizer

    _, target, _ = tiny_demo
    tok = AutoTokenizer.from_pretrained(target)
    enc = tok(CODE)["input_ids"]
    assert enc[0] == tok.bos_token_id and enc.count(tok.bos_token_id) == 1
    assert tok.decode(enc, skip_special_tokens=True) == CODE
    assert tok.decode(tok(CODE, add_special_tokens=False)["input_ids"]) == CODE


def test_draft_and_target_share_the_vocabulary(tiny_demo):
    _, target, draft = tiny_demo
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    t, d = Transformer.from_pretrained(target).config, Transformer.from_pretrained(draft).config
    assert t.vocab_size == d.vocab_size
    assert (t.bos_token_id, t.eos_token_id) == (d.bos_token_id, d.eos_token_id)
    assert d.num_hidden_layers == TINY.draft_layers < t.num_hidden_layers == TINY.target_layers


def test_ensure_does_not_rebuild_an_existing_pair(tiny_demo, monkeypatch):
    out, target, draft = tiny_demo
    stamp = (target / "model.safetensors").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("ensure_demo_pair rebuilt an existing pair")

    monkeypatch.setattr(demo_build, "build_demo_pair", refuse)
    assert ensure_demo_pair(TINY, out_dir=out, progress=False) == (target, draft)
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_rebuilds_an_incomplete_pair_and_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    (out / "target").mkdir(parents=True)  # a half pair from some earlier accident
    (out / "target" / "config.json").write_text("{}")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_build, "train_target", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_pair(TINY, out_dir=out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary directory left behind
    assert (out / "target" / "config.json").read_text() == "{}"  # and the old directory untouched


def test_default_demo_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("RADAR_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_demo_dir() == tmp_path / ".cache" / "radar" / "demo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_demo_dir() == tmp_path / "xdg" / "radar" / "demo"
    monkeypatch.setenv("RADAR_HOME", str(tmp_path / "home"))
    assert default_demo_dir() == tmp_path / "home" / "demo"


def test_config_is_validated():
    with pytest.raises(ValueError, match="question"):
        DemoConfig(prompt_template="Q: {prompt}")
    with pytest.raises(ValueError, match="more layers"):
        DemoConfig(target_layers=1, draft_layers=2)
