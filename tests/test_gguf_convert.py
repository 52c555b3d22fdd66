"""GGUF -> Hugging Face conversion: weights, config and tokenizer of tiny llama.cpp-style files (tiny_gguf.py),
checked against transformers models holding the same weights and against llama.cpp's own pre-tokenizer rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import regex
import torch
from tiny_gguf import CHAT_TEMPLATE, SHAPE, random_llama_state, reference_llama, vocabulary, write_gguf

from radar.decoding.model import Transformer
from radar.decoding.gguf_quant import unpermute_rows
from radar.ops.gguf_convert import ConversionError, convert_gguf

IDS = torch.tensor([[1, 70, 200, 265, 3, 99, 140, 7, 260, 31, 2, 150]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory):
    """(llama.cpp-style state, GGUF path, converted checkpoint dir) for a tied and an untied tiny model."""
    folder = tmp_path_factory.mktemp("gguf")
    state = random_llama_state(tied=request.param)
    gguf_path = write_gguf(state, folder / "tiny.gguf")
    return state, gguf_path, convert_gguf(gguf_path, folder / "hf")


# ------------------------------------------------------------------------------------------------- weights


def test_unpermute_restores_half_split_rows_per_head():
    # llama.cpp stores an 8-row head as rows (0, 4, 1, 5, 2, 6, 3, 7): row i of each rotary half side by side.
    stored = np.array([0, 4, 1, 5, 2, 6, 3, 7], dtype=np.float32)
    stored = np.concatenate([stored, stored + 8])[:, None]
    assert unpermute_rows(stored, n_heads=2)[:, 0].tolist() == list(range(16))


def test_converted_checkpoint_equals_the_reference_model(converted):
    state, _, out = converted
    assert torch.equal(logits(hf_model(out)), logits(reference_llama(state)))


def test_radar_transformer_matches_transformers_on_the_converted_dir(converted):
    _, _, out = converted
    torch.testing.assert_close(logits(Transformer.from_pretrained(out)), logits(hf_model(out)), atol=1e-5, rtol=1e-5)


def test_converted_checkpoint_equals_transformers_loading_the_gguf(converted):
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoModelForCausalLM

    _, gguf_path, out = converted
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    torch.testing.assert_close(logits(hf_model(out)), logits(direct), atol=1e-6, rtol=1e-6)


def test_rows_not_in_llama_cpp_order_give_a_different_model(tmp_path):
    # The reference comparison above can fail: a file whose q/k rows were never reordered converts to another model.
    state = random_llama_state()
    out = convert_gguf(write_gguf(state, tmp_path / "plain.gguf", permute=False), tmp_path / "hf")
    assert (logits(hf_model(out)) - logits(reference_llama(state))).abs().max() > 0.1


def test_config_comes_from_the_gguf_metadata(converted):
    state, _, out = converted
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                                   "intermediate_size", "max_position_embeddings", "rope_theta", "rms_norm_eps")} == {
        "num_hidden_layers": SHAPE["layers"], "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["kv_heads"], "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["intermediate"], "max_position_embeddings": SHAPE["context"],
        "rope_theta": SHAPE["rope_theta"], "rms_norm_eps": SHAPE["eps"]}
    assert config["tie_word_embeddings"] == ("output.weight" not in state)
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, len(vocabulary()))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_bfloat16_dtype_writes_bfloat16_weights(tmp_path):
    from safetensors import safe_open

    out = convert_gguf(write_gguf(random_llama_state(), tmp_path / "t.gguf"), tmp_path / "hf", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "gpt2"}, "architecture 'gpt2' is not supported"),
    ({"pre": "qwen2"}, "pre-tokenizer 'qwen2' is not supported"),
    ({"extra_tensor": "blk.0.attn_sinks.weight"}, "'blk.0.attn_sinks.weight' has no Llama counterpart"),
])
def test_unsupported_gguf_gets_a_one_line_error(tmp_path, kwargs, message):
    gguf_path = write_gguf(random_llama_state(), tmp_path / "t.gguf", **kwargs)
    with pytest.raises(ConversionError, match=message) as info:
        convert_gguf(gguf_path, tmp_path / "hf")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- tokenizer

# llama.cpp's "smollm" pre-tokenizer (llama-vocab.cpp): split off every \p{N}, then GPT-2's regex on each piece;
# text a regex does not match stays a piece of its own.
LLAMA_CPP_SMOLLM = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]
SAMPLES = ["    1. item", "12345", "a  b\n\n  c", "def f(x):\n    if x:\n        return 2*x\n", "It's 3.14 in 2024!",
           "  \t x", "x = [10, 200]  # 3 items", "café ü 日本", "tab\there\n"]


def llama_cpp_pieces(text: str) -> list[str]:
    pieces = [text]
    for pattern in LLAMA_CPP_SMOLLM:
        pieces = [part for piece in pieces for part in _split_keeping_gaps(pattern, piece)]
    return pieces


def _split_keeping_gaps(pattern: str, text: str) -> list[str]:
    parts, last = [], 0
    for m in regex.finditer(pattern, text):
        parts += [text[last:m.start()], m.group()]
        last = m.end()
    return [p for p in parts + [text[last:]] if p]


def _byte_level(piece: str) -> list[str]:
    """`piece` in byte-level symbols (a space is Ġ), as one piece."""
    from tokenizers.pre_tokenizers import ByteLevel

    return [p for p, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(piece)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(random_llama_state(), tmp_path_factory.mktemp("tok") / "tiny.gguf")


@pytest.fixture(scope="module")
def tokenizer(tiny_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(convert_gguf(tiny_gguf, tiny_gguf.parent / "hf")))


@pytest.mark.parametrize("text", SAMPLES)
def test_pre_tokenizer_splits_like_llama_cpp(tokenizer, text):
    ours = [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    expected = [p for piece in llama_cpp_pieces(text) for p in _byte_level(piece)]
    assert ours == expected


def test_digits_are_never_merged(tokenizer):
    # The vocabulary has "12" and the merge "1 2", but llama.cpp splits every digit off before BPE.
    vocab = vocabulary()
    assert tokenizer("12345", add_special_tokens=False)["input_ids"] == [vocab.index(d) for d in "12345"]


def test_whitespace_run_before_a_digit_stays_one_token(tokenizer):
    # GPT-2's regex alone would give "   " + " 1"; llama.cpp cuts at the digit first, so all four spaces stay one.
    ids = tokenizer("    1. item", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["ĠĠĠĠ", "1", ".", "Ġitem"]


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_transformers_gguf_tokenizer_agrees_on_text_without_digits(tiny_gguf, tokenizer):
    # transformers does not know llama.cpp's "smollm" rule and falls back to GPT-2's regex, which only differs
    # where digits are involved: on digit-free text it is an independent check of vocabulary and merges.
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for text in [s for s in SAMPLES if not regex.search(r"\p{N}", s)]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == theirs(text, add_special_tokens=False)[
            "input_ids"], text


def test_special_tokens_and_chat_template_come_from_the_gguf(tokenizer):
    from radar.decoding.chat import render_chat

    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    text, add_special = render_chat(tokenizer, "hi")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and not add_special
    assert tokenizer(text, add_special_tokens=False)["input_ids"][:1] == [1]


# ------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2_dir():
    from radar.ops.fetch import is_complete, model_dir

    path = model_dir("smollm2-135m-instruct")
    if not is_complete(path):
        pytest.skip("smollm2-135m-instruct not fetched (radar models fetch smollm2-135m-instruct)")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.slow
def test_smollm2_greedy_ar_equals_transformers_generate(smollm2_dir):
    from radar.decoding.pair import ModelPair

    pair = ModelPair.load(smollm2_dir, device="cpu", dtype="float32")
    ids = pair.chat_ids("Write a Python function that reverses a string.")
    ours = pair.generate(ids, "ar", max_new_tokens=24).token_ids
    with torch.no_grad():
        theirs = hf_model(smollm2_dir).generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    assert ours == theirs[0, len(ids):].tolist()
    assert "def " in pair.decode(ours)


@pytest.mark.parametrize("text, ids", [
    ("    1. item", [289, 33, 30, 5033]),
    ("12345", [33, 34, 35, 36, 37]),
    ("a  b\n\n  c", [81, 216, 278, 8866, 265]),
    ("It's 3.14", [1589, 506, 216, 35, 30, 33, 36]),
])
def test_smollm2_tokenizer_pins_llama_cpp_ids(smollm2_tokenizer, text, ids):
    # Each llama.cpp piece of these strings is a single vocabulary entry, so the pinned ids are those entries.
    pieces = [p for piece in llama_cpp_pieces(text) for p in _byte_level(piece)]
    assert smollm2_tokenizer.convert_tokens_to_ids(pieces) == ids
    assert smollm2_tokenizer(text, add_special_tokens=False)["input_ids"] == ids


