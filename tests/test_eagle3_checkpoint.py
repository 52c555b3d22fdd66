"""EAGLE-3 head checkpoints: the published layout (config.json `LlamaForCausalLMEagle3`, the tensor names SGLang
and vLLM load), a save/load round trip that decodes the same, and one-line errors for heads that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radar.decoding.drafters import SmallLMDrafter
from radar.decoding.eagle3 import Eagle3Drafter, Eagle3Head, default_layer_ids, is_eagle3_dir
from radar.decoding.generate import generate_speculative
from radar.decoding.model import ModelLoadError, Transformer
from radar.decoding.pair import ModelPair
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import TreeConfig
from radar.decoding.verify import Sampling

from tiny_models import make_tiny_eagle3, make_tiny_llama, random_ids

PUBLISHED_TENSORS = {
    "fc.weight",
    *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")),
    *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
}


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Transformer:
    return Transformer.from_pretrained(make_tiny_llama(tmp_path_factory.mktemp("t"), vocab=128, layers=4))


@pytest.fixture
def head_dir(target, tmp_path) -> Path:
    make_tiny_eagle3(target, draft_vocab=48, layer_ids=(0, 1, 2)).save_pretrained(tmp_path / "head")
    return tmp_path / "head"


def decode(target: Transformer, head: Eagle3Head) -> tuple[list[int], list[int]]:
    """(tokens, accept lengths) of a greedy tree:3 decode: equal only if the drafts were equal too."""
    prompt = random_ids(10, 128, seed=1)[0].tolist()
    r = generate_speculative(target, Eagle3Drafter(head), prompt, TreeConfig(3, 3, 12), FixedDepth(3), Sampling(), 16)
    return r.token_ids, r.stats.accept_lengths


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, drop: str | None = None, **replace) -> None:
    state = load_file(path / "model.safetensors")
    state.pop(drop, None)
    state.update(replace)
    save_file(state, path / "model.safetensors")


def load_error(path: Path, target: Transformer) -> str:
    with pytest.raises(ModelLoadError) as info:
        Eagle3Head.from_pretrained(path).bind(target)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------ layout


def test_a_saved_head_has_the_published_config_and_tensor_names(head_dir):
    cfg = json.loads((head_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert (cfg["draft_vocab_size"], cfg["vocab_size"], cfg["target_hidden_size"], cfg["num_hidden_layers"]) == (48, 128, 64, 1)
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}
    state = load_file(head_dir / "model.safetensors")
    assert set(state) == PUBLISHED_TENSORS  # the embedding is the target's, so it is not saved
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    assert state["midlayer.self_attn.q_proj.weight"].shape == (64, 2 * 64)  # attention reads [embedding, hidden]
    assert state["fc.weight"].shape == (64, 3 * 64)


def test_a_saved_head_loads_back_with_the_same_weights_and_decodes_the_same(target, tmp_path):
    head = make_tiny_eagle3(target, draft_vocab=48, layer_ids=(0, 1, 2), seed=4).bind(target)
    head.save_pretrained(tmp_path / "head")
    loaded = Eagle3Head.from_pretrained(tmp_path / "head").bind(target)
    assert loaded.config == head.config
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert decode(target, loaded) == decode(target, head)


def test_a_head_with_its_own_embedding_saves_and_loads_it(target, tmp_path):
    head = make_tiny_eagle3(target, draft_vocab=48, hidden=40, embedding=True).bind(target)
    head.save_pretrained(tmp_path / "head")
    assert "embed_tokens.weight" in load_file(tmp_path / "head" / "model.safetensors")
    loaded = Eagle3Head.from_pretrained(tmp_path / "head").bind(target)
    assert not loaded.shared_embedding
    assert torch.equal(loaded.embed_tokens.weight, head.embed_tokens.weight)
    assert decode(target, loaded) == decode(target, head)


def test_a_head_without_layer_ids_reads_eagle3s_default_layers(target, tmp_path):
    make_tiny_eagle3(target, draft_vocab=48).save_pretrained(tmp_path / "head")
    assert "eagle_config" not in json.loads((tmp_path / "head" / "config.json").read_text())
    head = Eagle3Head.from_pretrained(tmp_path / "head").bind(target)
    assert head.config.layer_ids == default_layer_ids(4)
    assert Eagle3Drafter(head).capture == default_layer_ids(4)


def test_default_layer_ids_are_the_outputs_of_layers_1_n_over_2_minus_1_and_n_minus_4():
    assert default_layer_ids(30) == (1, 14, 26)  # SmolLM2-135M: the inputs of layers 2, 15 and 27
    assert default_layer_ids(32) == (1, 15, 28)
    assert default_layer_ids(2) == (1, 0, 0)  # clamped into range on tiny targets


def test_layer_ids_named_at_the_top_level_of_the_config_are_read(target, head_dir):
    edit_config(head_dir, eagle_config=None, eagle_aux_hidden_state_layer_ids=[2, 1, 0])
    assert Eagle3Head.from_pretrained(head_dir).bind(target).config.layer_ids == (2, 1, 0)


def test_a_model_pair_tells_a_head_from_a_small_lm_by_its_config(tiny_pair, tmp_path):
    target_dir, draft_dir = tiny_pair
    make_tiny_eagle3(Transformer.from_pretrained(target_dir), layer_ids=(0, 1, 1)).save_pretrained(tmp_path / "head")
    assert is_eagle3_dir(tmp_path / "head") and not is_eagle3_dir(draft_dir)
    assert isinstance(ModelPair.load(target_dir, tmp_path / "head", device="cpu").drafter(), Eagle3Drafter)
    assert isinstance(ModelPair.load(target_dir, draft_dir, device="cpu").drafter(), SmallLMDrafter)


# ------------------------------------------------------------------------------------------ errors


def test_a_head_missing_a_tensor_gets_a_one_line_error(target, head_dir):
    edit_tensors(head_dir, drop="midlayer.hidden_norm.weight")
    assert "missing tensor(s) midlayer.hidden_norm.weight" in load_error(head_dir, target)


def test_a_wrong_draft_vocab_size_gets_a_one_line_error(target, head_dir):
    edit_config(head_dir, draft_vocab_size=47)
    assert "draft_vocab_size is 47 in config.json but lm_head.weight has 48 rows" in load_error(head_dir, target)


def test_a_d2t_of_the_wrong_length_gets_a_one_line_error(target, head_dir):
    edit_tensors(head_dir, d2t=torch.zeros(40, dtype=torch.long))
    assert "draft_vocab_size is 48 in config.json but d2t has 40 rows" in load_error(head_dir, target)


def test_a_d2t_pointing_outside_the_target_vocabulary_gets_a_one_line_error(target, head_dir):
    edit_tensors(head_dir, d2t=torch.full((48,), 100, dtype=torch.long))
    assert "d2t maps draft ids outside the 128-token target vocabulary" in load_error(head_dir, target)


def test_a_head_for_another_hidden_size_gets_a_one_line_error(tmp_path, head_dir):
    wider = Transformer.from_pretrained(make_tiny_llama(tmp_path, vocab=128, hidden=96, heads=4, layers=4))
    assert "reads hidden states of size 64, the target's are 96" in load_error(head_dir, wider)


def test_a_head_for_another_vocabulary_gets_a_one_line_error(tmp_path, head_dir):
    other = Transformer.from_pretrained(make_tiny_llama(tmp_path, vocab=160, layers=4))
    assert "for a 128-token vocabulary, the target has 160" in load_error(head_dir, other)


def test_layer_ids_out_of_range_get_a_one_line_error(target, head_dir):
    edit_config(head_dir, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 4]})
    assert "layer ids [0, 1, 4] are out of range for a target of 4 layers" in load_error(head_dir, target)


def test_a_head_without_safetensors_gets_a_one_line_error(target, head_dir):
    (head_dir / "model.safetensors").unlink()
    assert "no model.safetensors" in load_error(head_dir, target)


def test_model_pair_load_reports_a_broken_head_in_one_line(tiny_pair, tmp_path):
    target_dir, _ = tiny_pair
    make_tiny_eagle3(Transformer.from_pretrained(target_dir), layer_ids=(0, 1, 1)).save_pretrained(tmp_path / "head")
    edit_tensors(tmp_path / "head", drop="fc.weight")
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\) fc.weight$"):
        ModelPair.load(target_dir, tmp_path / "head", device="cpu")
