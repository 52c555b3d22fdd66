"""A Llama-family decoder-only transformer in plain PyTorch, with a KV cache built for tree verification.

One file, read top to bottom: config, rotary embeddings, attention, MLP, block, model, KV cache, HF I/O.
Parameter names match Hugging Face's LlamaForCausalLM so checkpoints load and save without renaming.

Cache "slots" are positions in the cache tensor; "positions" are RoPE positions. They differ inside a draft tree:
several siblings share a position but each has its own slot. After verification `KVCache.keep` compacts the
accepted path so slots and positions agree again for the committed prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ModelLoadError(ValueError):
    """A model directory is missing, malformed or not a Llama-family checkpoint."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 and Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias only
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """Build from a transformers config object (LlamaConfig, MistralConfig, Qwen2Config)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model_type {model_type!r} is not a Llama-family architecture (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"hidden_act {act!r} is not supported: Llama-family MLPs use silu")
        # transformers 5 moved rope settings into `rope_parameters`; older versions use rope_theta + rope_scaling.
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        rope_theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
        scaling = getattr(hf, "rope_scaling", None) or rope or None
        if scaling is not None:
            scaling = dict(scaling)
            scaling.pop("rope_theta", None)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
        eos = hf.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None),
            max_position_embeddings=hf.max_position_embeddings,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            bos_token_id=hf.bos_token_id,
            eos_token_id=eos,
            model_type=model_type,
        )

    def to_hf(self):
        """The equivalent transformers config object, for saving and for cross-checking."""
        from transformers import LlamaConfig, Qwen2Config

        if self.model_type == "qwen2":
            if self.o_bias or self.mlp_bias:
                raise ValueError("Qwen2 checkpoints have no output-projection or MLP bias")
            cls, extra = Qwen2Config, {}
        else:
            if self.qkv_bias != self.o_bias:
                raise ValueError("Llama checkpoints put attention bias on q, k, v and o together")
            cls, extra = LlamaConfig, {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else (self.eos_token_id or None)
        return cls(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,  # transformers edits it in place
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            **extra,
        )


# ----------------------------------------------------------------------------------------------------- rotary


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for RoPE, with linear and Llama-3 scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between them interpolated.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(medium, blended, out).float()
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (B, 1, Q, D) for RoPE positions (B, Q)."""
    freqs = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, Q, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, Q, D) by the (B, 1, Q, D) angles, in the half-split layout HF uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ------------------------------------------------------------------------------------------------- the model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, in_features: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d_in = in_features or cfg.hidden_size  # an EAGLE-3 head attends over [embedding, hidden]: 2 * hidden_size
        self.q_proj = nn.Linear(d_in, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d_in, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d_in, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, layer_cache: tuple[torch.Tensor, torch.Tensor] | None, start: int):
        """`mask` may instead be a callable (xq, xk, xv) -> output that attends itself (radar.decoding.packed)."""
        b, q, _ = x.shape
        xq = self.q_proj(x).view(b, q, self.n_heads, self.head_dim).transpose(1, 2)
        xk = self.k_proj(x).view(b, q, self.n_kv, self.head_dim).transpose(1, 2)
        xv = self.v_proj(x).view(b, q, self.n_kv, self.head_dim).transpose(1, 2)
        xq, xk = apply_rope(xq, cos, sin), apply_rope(xk, cos, sin)
        out = mask(xq, xk, xv) if callable(mask) else attend(xq, xk, xv, mask, layer_cache, start)
        return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(b, q, -1))


def attend(xq, xk, xv, mask, layer_cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
    """Attention of new queries (B, H, Q, D) over the cached slots [0, start) and the new keys, which it caches."""
    if layer_cache is not None:
        (k_cache, v_cache), end = layer_cache, start + xk.shape[2]
        k_cache[:, :, start:end], v_cache[:, :, start:end] = xk, xv
        xk, xv = k_cache[:, :, :end], v_cache[:, :, :end]
    gqa = xk.shape[1] != xq.shape[1]  # in the cache's precision (see KVCache); the caller casts back
    return F.scaled_dot_product_attention(xq.to(xk.dtype), xk, xv, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, layer_cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LayerCapture:
    """Asks a forward for some layers' outputs (the residual stream after layer i, 0-based, before the final norm);
    the forward sets `hidden` (B, Q, len(layers) * hidden_size), concatenated in the order of `layers`."""

    layers: tuple[int, ...]
    hidden: torch.Tensor | None = None


def attention_mask(q: int, start: int, tree_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """The (Q, start + Q) boolean mask of Q new tokens after `start` cached slots (see `Transformer.forward`)."""
    if q == 1 and tree_mask is None:
        return None  # one new token sees everything cached: no mask needed, and SDPA takes its fast path
    tail = tree_mask.to(device) if tree_mask is not None else torch.ones(q, q, dtype=torch.bool, device=device).tril()
    prefix = torch.ones(q, start + q - tail.shape[1], dtype=torch.bool, device=device)
    return torch.cat((prefix, tail), dim=1)


class KVCache:
    """Preallocated keys and values for every layer; `length` slots are filled. Attention runs in the cache's dtype.

    An exact (float64) cache keeps speculation lossless bit for bit on a CPU: a token verified in a tree sees its
    keys at other slots, among masked siblings, and the CPU's attention kernels sum in an order that depends on that
    layout. In bf16, even fp32, the difference rounds into the activations and flips near-tied argmaxes within a
    hundred tokens; in float64 it stays far below one rounding step. Linear layers need nothing: a row's result does
    not depend on how many rows a matmul gets (up to 32 on x86; `prefill` feeds every decoder the same prompt)."""

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.length = max_len, 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def keep(self, start: int, slots: torch.Tensor | list[int]) -> None:
        """Keep slots [0, start) plus the given later slots (in order), moved down to start, and drop the rest."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.k.device)
        n = slots.numel()
        if n:
            # index_select copies first, so overlapping source and destination ranges are safe.
            self.k[:, :, :, start : start + n] = self.k.index_select(3, slots)
            self.v[:, :, :, start : start + n] = self.v.index_select(3, slots)
        self.length = start + n


class Transformer(nn.Module):
    """Llama-family causal LM; `forward` takes explicit positions and an optional tree mask."""

    quantized = False  # set by gguf_quant.load_gguf_model, whose linear layers hold integer blocks

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
                norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:  # of the activations (a quantized model's weights are integers)
        return self.model.norm.weight.dtype

    def new_cache(self, max_len: int, batch: int = 1, exact: bool | None = None) -> KVCache:
        """A cache for decoding; `exact` (default: on a CPU) keeps it in float64 (see KVCache)."""
        exact = self.device.type == "cpu" if exact is None else exact
        return KVCache(self.config, max_len, batch, device=self.device, dtype=torch.float64 if exact else self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
        capture: LayerCapture | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, Q), appending their keys and values to `cache`.

        `tree_mask` (Q, T) bool says which of the last T slots (the new tokens being the last Q of them) each new
        token sees: itself and its ancestors in a draft tree. Every slot before those T is visible to all. Without
        it the new tokens are causal. `position_ids` default to the slots the tokens occupy. `capture`, when
        given, receives the outputs of the layers it names for every new token (`last_only` cuts the logits only).
        """
        b, q = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + q > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {q} tokens > {cache.max_len} slots")
        if position_ids is None:
            position_ids = torch.arange(start, start + q, device=input_ids.device).expand(b, q)
        mask = attention_mask(q, start, tree_mask, input_ids.device)
        cos, sin = rope_angles(position_ids, self.inv_freq, self.dtype)

        x = self.model.embed_tokens(input_ids)
        kept = {}
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache.layer(i) if cache is not None else None, start)
            if capture is not None and i in capture.layers:
                kept[i] = x
        if capture is not None:
            capture.hidden = torch.cat([kept[i] for i in capture.layers], dim=-1)
        if cache is not None:
            cache.length = start + q
        return self.lm_head(self.model.norm(x[:, -1:] if last_only else x))

    # --------------------------------------------------------------------------------------- HF checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """Load a Hugging Face Llama-family checkpoint directory (config.json + safetensors, sharded or not)."""
        from safetensors.torch import load_file

        cfg, path = ModelConfig.from_hf(load_hf_config(path)), Path(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints load)")
        with torch.device("meta"):
            model = cls(cfg)
        state = {k: v for name in files for k, v in load_file(str(path / name), device=str(device)).items()}
        state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        missing = set(shapes) - set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        unexpected = set(state) - set(shapes)
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(shapes[k])}" for k in sorted(state.keys() & shapes.keys())
                 if state[k].shape != shapes[k]]
        if missing or unexpected or wrong:
            raise ModelLoadError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, unexpected "
                                 f"{sorted(unexpected)[:3]}, wrong shape {wrong[:3]})")
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors in the layout transformers reads."""
        from safetensors.torch import save_file

        (path := Path(path)).mkdir(parents=True, exist_ok=True)
        hf = self.config.to_hf()
        hf.architectures = ["Qwen2ForCausalLM" if self.config.model_type == "qwen2" else "LlamaForCausalLM"]
        hf.save_pretrained(path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # safetensors refuses shared tensors, and HF re-ties on load
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def load_hf_config(path: str | Path):
    """Read a checkpoint's config.json through transformers, with a clear error for anything unusable."""
    from transformers import AutoConfig

    if not (path := Path(path)).is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers raises several types for unknown or broken configs
        raise ModelLoadError(f"{path}/config.json could not be read: {exc}".splitlines()[0]) from None
    if getattr(hf, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{path}: model_type {getattr(hf, 'model_type', None)!r} is not a Llama-family "
                             f"architecture (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return hf
