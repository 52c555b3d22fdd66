"""Tiny random-init Hugging Face checkpoints for tests.

`make_tiny_llama` builds a transformers LlamaForCausalLM (or Qwen2ForCausalLM / MistralForCausalLM), gives every
parameter a non-trivial random value (HF's own init leaves norms at 1 and biases at 0, which would hide bugs in
those paths, and its 0.02 std makes logits nearly uniform), saves it with `save_pretrained` (safetensors) and
returns the directory. Same arguments and seed give the same weights.

Import it from test files with `from tiny_models import make_tiny_llama` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["make_tiny_llama", "make_tiny_eagle3", "hf_config", "load_hf_model", "hf_logits", "random_ids"]


def hf_config(
    *,
    vocab: int = 128,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int | None = None,
    tie: bool = False,
    rope_scaling: dict | None = None,
    rope_theta: float = 10000.0,
    model_type: str = "llama",
    attention_bias: bool = False,
    max_pos: int = 512,
    eos: int | list[int] | None = None,
    bos: int | None = None,
):
    """The transformers config object `make_tiny_llama` saves."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,  # transformers edits the dict in place
        tie_word_embeddings=tie,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    if model_type == "llama":
        return LlamaConfig(attention_bias=attention_bias, **common)
    if attention_bias:
        raise ValueError(f"attention_bias is a Llama option; {model_type} decides its own biases")
    if model_type == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if model_type == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown model_type {model_type!r}")


def make_tiny_llama(
    tmp_path: str | Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    name: str = "tiny",
    **shape,
) -> Path:
    """Save a random-init tiny HF causal LM to `tmp_path / name` and return that directory; `shape` takes
    `hf_config`'s keywords (vocab, hidden, layers, heads, kv_heads, tie, model_type, eos, bos, ...)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(**shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # tied weights appear once
            noise = torch.randn(p.shape, generator=gen)
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif pname.endswith("embed_tokens.weight"):
                p.copy_(noise)
            else:  # projections and biases
                p.copy_(0.1 * noise)
    out = Path(tmp_path) / name
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers reference model for a checkpoint, with eager (non-SDPA) attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


@torch.no_grad()
def hf_logits(path_or_model, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits (B, T, V) for `input_ids` on a checkpoint directory or an already loaded HF model."""
    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else load_hf_model(path_or_model)
    return model(input_ids=input_ids, use_cache=False).logits


def random_ids(length: int, vocab: int = 128, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids of shape (batch, length)."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """(target_dir, draft_dir): a tiny Llama with a 320-token BPE tokenizer and, as draft, a noisy copy of it
    (so drafts are often accepted)."""
    from radar.decoding.model import Transformer
    from tiny_tokenizer import add_tokenizer

    target = add_tokenizer(make_tiny_llama(root, vocab=320, eos=2, bos=1, max_pos=1024, name="target"))
    model = Transformer.from_pretrained(target)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=gen))
    draft = root / "draft"
    model.save_pretrained(draft)
    add_tokenizer(draft)
    return target, draft


def make_tiny_eagle3(
    target,
    *,
    draft_vocab: int = 48,
    layer_ids: tuple[int, ...] | None = None,
    hidden: int | None = None,
    embedding: bool = False,
    seed: int = 0,
):
    """A random-init EAGLE-3 head (unbound) for a loaded target `Transformer`: norms near 1, projections at 0.1 std,
    a random draft vocabulary of `draft_vocab` target ids. `hidden` other than the target's needs `embedding`."""
    from dataclasses import replace

    from radar.decoding.eagle3 import Eagle3Config, Eagle3Head, draft_vocab_maps

    cfg = Eagle3Config.for_target(target.config, draft_vocab, layer_ids)
    if hidden is not None:
        heads = 4 if hidden % 4 == 0 else 1
        cfg.layer = replace(cfg.layer, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=1,
                            head_dim=hidden // heads, intermediate_size=2 * hidden)
    head = Eagle3Head(cfg, embedding=embedding)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else (noise if "embed" in name else 0.1 * noise))
        d2t, t2d = draft_vocab_maps(torch.randperm(target.config.vocab_size, generator=gen)[:draft_vocab], target.config.vocab_size)
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
    return head.eval()
