"""Tiny GGUF files written the way llama.cpp's converter writes a Llama model, and wheels that carry them, for the
GGUF conversion and fetch tests. Import with `from tiny_gguf import ...` (pytest puts tests/ on sys.path).

The reference for a converted checkpoint is a transformers LlamaForCausalLM holding the same weights. Quantized
tensors are compared exactly: GGUF quantization works row by row (blocks along the input dimension), so
quantizing llama.cpp's reordered rows and then dequantizing gives the reordered rows of the dequantized original;
the reference model holds `dequantize(quantize(w))` in Hugging Face's order.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from tokenizers.pre_tokenizers import ByteLevel

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ Ġ", "ĠĠ ĠĠ", "1 2", "i t", "it e", "ite m", "Ġ item"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPE = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, context=128, rope_theta=50000.0, eps=1e-5)
# Which GGUF type each llama.cpp tensor is stored as (the rest F32): both quantized types the SmolLM2 file uses.
QTYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
          "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_1, "output": Q.Q8_0}
LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}


def vocabulary() -> list[str]:
    """Special tokens, the 256 byte-level symbols, then one token per merge."""
    return SPECIAL + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's convert_hf_to_gguf.py writes for q and k: each head's two rotary halves
    interleaved, row i of the first half followed by row i of the second."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def random_llama_state(tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of a 2-layer GQA Llama under llama.cpp's tensor names, Hugging Face row order."""
    g = np.random.default_rng(seed)
    h, f, vocab = SHAPE["hidden"], SHAPE["intermediate"], len(vocabulary())
    kv = SHAPE["kv_heads"] * h // SHAPE["heads"]
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h), "ffn_gate": (f, h),
              "ffn_up": (f, h), "ffn_down": (h, f), "attn_norm": (h,), "ffn_norm": (h,)}
    state = {"token_embd.weight": g.normal(0, 0.5, (vocab, h)), "output_norm.weight": 1 + 0.1 * g.normal(size=h)}
    if not tied:
        state["output.weight"] = g.normal(0, 0.2, (vocab, h))
    for i in range(SHAPE["layers"]):
        for name, shape in shapes.items():
            norm = len(shape) == 1
            state[f"blk.{i}.{name}.weight"] = 1 + 0.1 * g.normal(size=shape) if norm else g.normal(0, 0.2, shape)
    return {k: v.astype(np.float32) for k, v in state.items()}


def _kind(name: str) -> str:
    return name.split(".")[-2]


def snapped(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each tensor as the GGUF will hold it once dequantized (quantization error included)."""
    return {k: dequantize(quantize(v, QTYPES[_kind(k)]), QTYPES[_kind(k)]) if _kind(k) in QTYPES else v
            for k, v in state.items()}


def reference_llama(state: dict[str, np.ndarray]):
    """A transformers LlamaForCausalLM holding `snapped(state)`: what a correct conversion must reproduce."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = "output.weight" not in state
    config = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=SHAPE["hidden"],
                         intermediate_size=SHAPE["intermediate"], num_hidden_layers=SHAPE["layers"],
                         num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                         max_position_embeddings=SHAPE["context"], rms_norm_eps=SHAPE["eps"],
                         rope_theta=SHAPE["rope_theta"], tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    to_hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    for i in range(SHAPE["layers"]):
        to_hf.update({f"blk.{i}.{cpp}.weight": f"model.layers.{i}.{hf}.weight" for hf, cpp in LLAMA_CPP_NAMES.items()})
    weights = {to_hf[k]: torch.from_numpy(v.copy()) for k, v in snapped(state).items()}
    model.load_state_dict(weights, strict=False)
    if tied:
        model.tie_weights()
    return model


def write_gguf(state: dict[str, np.ndarray], path: Path, permute: bool = True, pre: str = "smollm",
               arch: str = "llama", extra_tensor: str | None = None) -> Path:
    """Write `state` as llama.cpp would: q/k rows reordered (unless `permute` is False), tensors quantized per
    QTYPES, hyperparameters and a byte-level BPE tokenizer in the metadata. `extra_tensor` appends a tensor
    with that name last."""
    tokens = vocabulary()
    w = GGUFWriter(str(path), arch)
    w.add_block_count(SHAPE["layers"])
    w.add_context_length(SHAPE["context"])
    w.add_embedding_length(SHAPE["hidden"])
    w.add_feed_forward_length(SHAPE["intermediate"])
    w.add_head_count(SHAPE["heads"])
    w.add_head_count_kv(SHAPE["kv_heads"])
    w.add_rope_dimension_count(SHAPE["hidden"] // SHAPE["heads"])
    w.add_rope_freq_base(SHAPE["rope_theta"])
    w.add_layer_norm_rms_eps(SHAPE["eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL] * len(SPECIAL) + [TokenType.NORMAL] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, value in state.items():
        kind = _kind(name)
        if permute and kind in ("attn_q", "attn_k"):
            value = llama_cpp_permute(value, SHAPE["heads"] if kind == "attn_q" else SHAPE["kv_heads"])
        if kind in QTYPES:
            w.add_tensor(name, quantize(value, QTYPES[kind]), raw_dtype=QTYPES[kind])
        else:
            w.add_tensor(name, value)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_wheel(folder: Path, package: str, version: str, files: dict[str, bytes],
               license: str | None = "MIT") -> Path:
    """A minimal pure-Python wheel holding `files`, that `pip download` accepts from a find-links folder."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        if license:
            z.writestr(f"{info}/LICENSE", f"{license} license text\n")
        z.writestr(f"{info}/RECORD", "")
    return path
