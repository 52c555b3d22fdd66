"""A Llama model straight from its GGUF file, its weights kept in the blocks they ship in, on PyTorch's int4 kernel.

llama.cpp stores a weight matrix row by row in blocks of 32 weights that decode as `w = scale * q + zero`:

- Q4_0 (18 bytes): fp16 d, 32 4-bit q;        w = d * (q - 8)
- Q4_1 (20 bytes): fp16 d, fp16 m, 32 4-bit q; w = d * q + m
- Q8_0 (34 bytes): fp16 d, 32 int8 q;          w = d * q

PyTorch's weight-only CPU kernel `_weight_int4pack_mm_for_cpu` computes with `w = (q - 8) * scale + zero` per group
of 32, so the 4-bit kinds map onto it exactly (up to the kernel's bf16 scales). An 8-bit q does not fit 4 bits, and
`_weight_int8pack_mm` has one scale per row where Q8_0 has one per block; so a Q8_0 matrix is split as
`q = 16 * hi + lo` into two 4-bit halves laid side by side along the input dimension, and the input is repeated:
`x @ w.T = [x, x] @ [16 d hi, d lo].T`, the same numbers in one int4 call (exact up to the kernel's bf16 scales,
as for the 4-bit kinds). The activations are bf16: the kernel's fast path (benchmarks/README.md has the measured
costs of the other dtypes).

A kernel's row result does not depend on how many rows it gets, so a tree verified in one forward gets the bits
its tokens get decoded one at a time: speculation stays lossless against AR on the same quantized weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from radar.decoding.model import ModelConfig, ModelLoadError, RMSNorm, Transformer, load_hf_config, rope_inv_freq

GROUP = 32  # weights per block in every kind read here
ACTIVATIONS = torch.bfloat16
GGUF_FILE = "model.gguf"  # the GGUF a checkpoint directory keeps beside its converted weights (radar.ops.fetch)

# llama.cpp tensor names -> Hugging Face LlamaForCausalLM names; `blk.N.` becomes `model.layers.N.`.
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFLayoutError(ModelLoadError):
    """A GGUF file this project cannot read: its metadata, tokenizer, tensor names or block kinds."""


def hf_name(name: str) -> str:
    """The Hugging Face parameter name of a llama.cpp tensor name (`blk.3.attn_q.weight` -> `model.layers.3...`)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in TOP_NAMES and parts[1] == "weight":
        return f"{TOP_NAMES[parts[0]]}.weight"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    raise GGUFLayoutError(f"GGUF tensor {name!r} has no Llama counterpart")


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it interleaves the two rotary halves (rows 0, d/2, 1,
    d/2+1, ...); Hugging Face keeps the first half of the head's rows, then the second. Works on any row data,
    raw quantized blocks included, since blocks never span rows."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(rows, *weight.shape[1:])


# ------------------------------------------------------------------------------------------------------ blocks


@dataclass
class Blocks:
    """A (rows, cols) matrix as integer codes and per-block affine terms: w[r, c] = scale[r, b] * q[r, c] +
    zero[r, b] for b = c // 32. Q4 codes are 0..15, Q8_0 codes -128..127 (`zero` is None)."""

    q: torch.Tensor  # (rows, cols) int8 or uint8
    scale: torch.Tensor  # (rows, cols // 32) float32, exactly the file's fp16 values
    zero: torch.Tensor | None  # (rows, cols // 32) float32 or None

    def dequantize(self) -> torch.Tensor:
        """The matrix in float32, exactly as llama.cpp decodes it."""
        rows, cols = self.q.shape
        w = self.q.float().view(rows, -1, GROUP) * self.scale[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return w.view(rows, cols)


def _f16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(raw: np.ndarray) -> np.ndarray:
    # A block's 16 bytes hold weights 0-15 in their low nibbles and weights 16-31 in their high ones.
    return np.concatenate((raw & 0x0F, raw >> 4), axis=-1)


def decode_blocks(kind: str, raw: np.ndarray) -> Blocks:
    """The codes and affine terms of GGUF blocks `raw` (rows, bytes per row), stored as `kind`."""
    rows = raw.shape[0]
    if kind == "Q8_0":
        b = raw.reshape(rows, -1, 34)
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1)
        return Blocks(torch.from_numpy(q.copy()), _f16(b[..., :2]), None)
    if kind == "Q4_1":
        b = raw.reshape(rows, -1, 20)
        q = _nibbles(b[..., 4:]).reshape(rows, -1)
        return Blocks(torch.from_numpy(q.copy()), _f16(b[..., :2]), _f16(b[..., 2:4]))
    if kind == "Q4_0":
        b = raw.reshape(rows, -1, 18)
        q = _nibbles(b[..., 2:]).reshape(rows, -1)
        d = _f16(b[..., :2])
        return Blocks(torch.from_numpy(q.copy()), d, -8 * d)
    raise GGUFLayoutError(f"GGUF blocks of kind {kind} are not supported by the gguf precision (supported: Q4_0, "
                          "Q4_1, Q8_0, F32, F16, BF16); use --precision bfloat16 or float32")


def quantize_blocks(weight: torch.Tensor) -> Blocks:
    """Q8_0-style blocks of a float matrix: each block's 32 weights as int8 codes of one scale, its absmax / 127."""
    rows, cols = weight.shape
    if cols % GROUP:
        raise GGUFLayoutError(f"a quantized matrix needs a multiple of {GROUP} columns, not {cols}")
    w = weight.detach().float().view(rows, -1, GROUP)
    # Rounded to the kernel's bf16 first, so the codes are chosen for the scale it will really apply.
    scale = (w.abs().amax(-1) / 127).to(ACTIVATIONS).float()
    q = (w / scale.clamp_min(1e-30)[..., None]).round().clamp(-128, 127).to(torch.int8)
    return Blocks(q.view(rows, cols), scale, None)


def quantize_linears(module: nn.Module) -> nn.Module:
    """`module` with every bias-free nn.Linear whose inputs fill whole blocks on the int4 kernel (`quantize_blocks`)
    and every other parameter in bf16, the kernel's activations: a draft beside a gguf target, whose calls read
    one or a few rows. 8-bit codes, not 4: the draft then proposes what its float weights propose. Call it before
    the draft shares any module with its target, which must stay as it is."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and child.bias is None and child.in_features % GROUP == 0:
            module.set_submodule(name, Int4Linear(quantize_blocks(child.weight)))
    # Parameters only: buffers keep their dtype (RoPE frequencies stay float32, the kernel's blocks are set).
    for param in module.parameters():
        param.data = param.data.to(ACTIVATIONS)
    return module.requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ layers


class Int4Linear(nn.Module):
    """y = x @ w.T for a block-quantized w, in one call of PyTorch's int4 weight-only kernel (see the module doc)."""

    def __init__(self, blocks: Blocks):
        super().__init__()
        rows, cols = blocks.q.shape
        if cols % GROUP:
            raise GGUFLayoutError(f"a quantized matrix needs a multiple of {GROUP} columns, not {cols}")
        zero = blocks.zero if blocks.zero is not None else torch.zeros_like(blocks.scale)
        if blocks.q.dtype == torch.uint8:  # 4-bit codes: (q - 8) * d + (zero + 8 d)
            codes, scale, zero = blocks.q.int(), blocks.scale, zero + 8 * blocks.scale
        else:  # 8-bit codes: hi = q >> 4 in -8..7 at scale 16 d, lo = q & 15 at scale d
            q = blocks.q.int()
            codes = torch.cat(((q >> 4) + 8, q & 15), dim=1)
            scale = torch.cat((16 * blocks.scale, blocks.scale), dim=1)
            zero = torch.cat((torch.zeros_like(zero), zero + 8 * blocks.scale), dim=1)
        self.in_features, self.out_features = cols, rows
        self.repeat = codes.shape[1] // cols
        pad = -rows % 16  # the kernel packs rows 16 at a time; padded rows (code 8, scale and zero 0) give 0
        codes = torch.cat((codes, torch.full((pad, codes.shape[1]), 8, dtype=codes.dtype)))
        scale, zero = (torch.cat((t, t.new_zeros(pad, t.shape[1]))) for t in (scale, zero))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1))
        self.register_buffer("scales_zeros", torch.stack((scale.t(), zero.t()), dim=-1).to(ACTIVATIONS).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few Python-level ops: at one token a call costs tens of microseconds, and a step makes 200 of them.
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.repeat > 1:
            x = x.repeat(1, self.repeat)
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.view(*lead, self.out_features)


class BlockEmbedding(nn.Module):
    """Token embeddings kept as blocks; a lookup decodes only the rows it reads, exactly, then rounds them to bf16."""

    def __init__(self, blocks: Blocks):
        super().__init__()
        self.num_embeddings, self.embedding_dim = blocks.q.shape
        self.register_buffer("q", blocks.q)
        self.register_buffer("scale", blocks.scale)
        self.register_buffer("zero", blocks.zero)  # None for Q8_0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.q[ids].float().unflatten(-1, (-1, GROUP)) * self.scale[ids][..., None]
        if self.zero is not None:
            w = w + self.zero[ids][..., None]
        return w.flatten(-2).to(ACTIVATIONS)


# ------------------------------------------------------------------------------------------------------ loading


def llama_tensors(reader, n_heads: int, n_kv_heads: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """(Hugging Face name, GGML kind, stored data) of every tensor a `gguf.GGUFReader` holds, q/k rows in Hugging
    Face's order (the data of a quantized kind is its raw block bytes, row by row)."""
    from gguf import GGMLQuantizationType

    heads = {"q_proj": n_heads, "k_proj": n_kv_heads}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        data, proj = np.asarray(tensor.data), name.split(".")[-2]
        yield name, GGMLQuantizationType(tensor.tensor_type).name, unpermute_rows(data, heads[proj]) if proj in heads else data


def read_gguf(path: str | Path, cfg: ModelConfig) -> dict[str, Blocks | torch.Tensor]:
    """Every tensor of a Llama GGUF file under its Hugging Face name: quantized ones as `Blocks`, float ones as
    float32 tensors."""
    from gguf import GGUFReader

    out: dict[str, Blocks | torch.Tensor] = {}
    reader = GGUFReader(str(path))
    for name, kind, data in llama_tensors(reader, cfg.num_attention_heads, cfg.num_key_value_heads):
        if kind in ("F32", "F16"):
            out[name] = torch.from_numpy(data.astype(np.float32))
        elif kind == "BF16":
            out[name] = torch.from_numpy(data.copy()).view(torch.bfloat16).float()
        else:
            out[name] = decode_blocks(kind, data)
    return out


def load_gguf_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The target of a checkpoint directory that keeps its source GGUF (`model.gguf`), computing in its native
    blocks: every linear layer and the (tied) output on the int4 kernel, bf16 activations."""
    checkpoint = Path(checkpoint)
    if torch.device(device).type != "cpu":
        raise ModelLoadError("the gguf precision runs on the CPU's int4 kernel only: pass --device cpu, or "
                             "--precision bfloat16 on the GPU")
    gguf = checkpoint / GGUF_FILE
    if not gguf.is_file():
        raise ModelLoadError(f"{checkpoint} has no {GGUF_FILE}: the gguf precision reads the GGUF a checkpoint was "
                             "converted from (`radar models fetch` keeps it: fetch the model again), or use --precision float32 or bfloat16")
    cfg = ModelConfig.from_hf(load_hf_config(checkpoint))
    try:
        return build_quantized(cfg, read_gguf(gguf, cfg))
    except GGUFLayoutError as exc:
        raise GGUFLayoutError(f"{gguf}: {exc}") from None


def build_quantized(cfg: ModelConfig, weights: dict[str, Blocks | torch.Tensor]) -> Transformer:
    """A Transformer whose linear layers and embedding hold `weights` (Hugging Face names): `Blocks` on the int4
    kernel, float tensors as bf16 layers; the norms in bf16."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            source = "model.embed_tokens.weight" if name == "lm_head" and cfg.tie_word_embeddings else f"{name}.weight"
            if source not in weights:
                raise GGUFLayoutError(f"no tensor for {source}")
            w = weights[source]
            if isinstance(w, Blocks):
                layer = BlockEmbedding(w) if isinstance(module, nn.Embedding) else Int4Linear(w)
            elif isinstance(module, nn.Embedding):
                layer = nn.Embedding.from_pretrained(w.to(ACTIVATIONS))
            else:
                layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=ACTIVATIONS).requires_grad_(False)
                layer.weight.copy_(w)
            model.set_submodule(name, layer)
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):  # a float embedding, shared
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, module in list(model.named_modules()):
        if isinstance(module, RMSNorm):
            if f"{name}.weight" not in weights:
                raise GGUFLayoutError(f"no tensor for {name}.weight")
            module.weight = nn.Parameter(weights[f"{name}.weight"].to(ACTIVATIONS), requires_grad=False)
    model.inv_freq = rope_inv_freq(cfg)
    model.quantized = True
    return model.eval()
