"""Turn a llama.cpp GGUF file of a Llama-architecture model into a Hugging Face checkpoint directory: config.json,
model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json, which this project's
`Transformer.from_pretrained` and transformers' `AutoModelForCausalLM` both load.

Two things differ between the formats beyond names. llama.cpp's converter reorders the rows of every q and k
projection so that each head's rotary pairs sit next to each other (GPT-J layout), while Hugging Face's Llama
rotates the first half of a head against the second: the rows are put back here. And the GGUF keeps the
tokenizer as a vocabulary, merges and the name of a llama.cpp pre-tokenizer, which is rebuilt here as a
`tokenizers` pipeline that splits text the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from radar.decoding.gguf_quant import LAYER_NAMES, GGUFLayoutError, llama_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_REQUIRED = object()


ConversionError = GGUFLayoutError  # one error for a GGUF file this project cannot read, converted or quantized


def gguf_field(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value of the GGUF file (a scalar, a string or a list), or `default` when it is absent."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ConversionError(f"the GGUF file has no {key!r} metadata")
        return default
    value = field.contents()
    if field.types[0] == GGUFValueType.FLOAT32:
        value = float(str(np.float32(value)))  # the float32 1e-5 stored by llama.cpp, not 9.99999974e-06
    return value


# ------------------------------------------------------------------------------------------------------ config


def hf_config(reader: GGUFReader) -> dict:
    """The config.json of a LlamaForCausalLM with the GGUF's shapes, rope, norm and special tokens."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = _REQUIRED) -> Any:
        return gguf_field(reader, f"llama.{key}", default)

    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", None) or get("rope.dimension_count", None) or hidden // n_heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ConversionError("partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        token_id = gguf_field(reader, f"tokenizer.ggml.{name}_token_id", None)
        config["pad_token_id" if name == "padding" else f"{name}_token_id"] = token_id
    return config


def _rope_scaling(reader: GGUFReader) -> dict | None:
    kind = gguf_field(reader, "llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": gguf_field(reader, "llama.rope.scaling.factor")}
    raise ConversionError(f"rope scaling {kind!r} is not supported (only none or linear)")


def generation_config(config: dict) -> dict:
    """generation_config.json: which tokens start, end and pad a generation."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


# ----------------------------------------------------------------------------------------------------- weights


def tensor_array(kind: str, data: np.ndarray) -> np.ndarray:
    """A GGUF tensor's stored data as float32 in Hugging Face's (out, in) layout, dequantized when it is quantized."""
    if kind == "F32":
        return np.array(data, dtype=np.float32)  # a copy: the reader's arrays are read-only file maps
    return dequantize(data, GGMLQuantizationType[kind]).astype(np.float32, copy=False)


def hf_tensors(reader: GGUFReader, config: dict, dtype: torch.dtype, progress: bool = False
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the GGUF under its Hugging Face name, dequantized and with q/k rows restored."""
    tensors = llama_tensors(reader, config["num_attention_heads"], config["num_key_value_heads"])
    for name, kind, data in tqdm(tensors, total=len(reader.tensors), desc="converting", unit="tensor",
                                 disable=not progress):
        yield name, torch.from_numpy(np.ascontiguousarray(tensor_array(kind, data))).to(dtype)


# --------------------------------------------------------------------------------------------------- tokenizer


# llama.cpp pre-tokenizers by the regexes they apply (llama-vocab.cpp): these split every digit off first (\p{N}),
# then apply GPT-2's regex to what is left ...
DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r")
# ... and these apply GPT-2's regex alone, as byte-level BPE does.
GPT2_REGEX = ("gpt2", "mpt", "olmo", "jais")


def _pre_tokenizer(name: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in GPT2_REGEX:
        return byte_level
    known = ", ".join(DIGITS_FIRST + GPT2_REGEX)
    raise ConversionError(f"GGUF pre-tokenizer {name!r} is not supported (supported: {known})")


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF's vocabulary, merges and pre-tokenizer."""
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ConversionError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    special = [t for t, k in zip(tokens, types) if k == TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, k in zip(tokens, types) if k == TokenType.USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos_id = gguf_field(reader, "tokenizer.ggml.bos_token_id", None)
    if gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_config(reader: GGUFReader) -> dict:
    """tokenizer_config.json: special tokens, the chat template and the context length."""
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")

    def token(name: str) -> str | None:
        token_id = gguf_field(reader, f"tokenizer.ggml.{name}_token_id", None)
        return None if token_id is None else tokens[token_id]

    config = {
        # The generic fast tokenizer uses tokenizer.json as written; a model-specific class may rebuild its own.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": gguf_field(reader, "llama.context_length"),
        "chat_template": gguf_field(reader, "tokenizer.chat_template", None),
    }
    return {k: v for k, v in config.items() if v is not None}


# ------------------------------------------------------------------------------------------------------ driver


def convert_gguf(src: str | Path, out: str | Path, dtype: str = "float32", progress: bool = False) -> Path:
    """Write the Hugging Face checkpoint of the GGUF file `src` into the directory `out` (created); returns `out`.

    Not atomic by itself: write into a temporary directory (`radar.common.files.new_dir`) and move it."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    reader = GGUFReader(str(src))
    config = hf_config(reader)
    config["torch_dtype"] = dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(reader).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    state = dict(hf_tensors(reader, config, DTYPES[dtype], progress))
    expected = _expected_names(config)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConversionError(f"GGUF tensors do not make a Llama model (missing {missing[:3]}, extra {extra[:3]})")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _expected_names(config: dict) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        names.update(f"model.layers.{i}.{hf}.weight" for hf in LAYER_NAMES.values())
    return names
