"""One forward for the model calls of several sequences: their tokens packed into one row, each attending only
to its own KV cache and its own tree.

Every call is what `Transformer.forward` or `Eagle3Head.forward` would have been given for one sequence (batch 1,
its cache, its tree mask, its positions). The linear layers, norms and the LM head run once over all the packed
tokens (weights read once per forward, which is where batching pays); attention runs per sequence over that
sequence's cache with that sequence's mask, so no token sees another request's keys. A row's result from a
matmul does not depend on the other rows on a CPU once a call has 4 rows or more (float32; the gguf kernel at any
count), so a packed verification gives each sequence the logits it would get alone: see tests/test_batching.py.
On CUDA the per-sequence attention is the Triton tree-attention kernel (`radar.decoding.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radar.decoding.model import KVCache, Transformer, attend, attention_mask, rope_angles


@dataclass
class Segment:
    """One call's rows in the packed forward."""

    offset: int
    q: int
    start: int  # the cache slots before the call
    cache: KVCache | None
    mask: torch.Tensor | None  # (q, start + q) bool, None: sees everything (one token)
    tail: torch.Tensor | None  # the mask's last columns, those not all visible (what the kernel reads)


class SegmentAttention:
    """The `mask` argument of an attention layer in a packed forward: attends each segment over its own cache."""

    def __init__(self, segments: list[Segment], layer: int):
        self.segments, self.layer = segments, layer

    def __call__(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
        from radar.decoding.kernels import tree_attention, triton_ready

        outs = []
        for s in self.segments:
            rows = slice(s.offset, s.offset + s.q)
            layer_cache = s.cache.layer(self.layer) if s.cache is not None else None
            q, k, v = xq[:, :, rows], xk[:, :, rows], xv[:, :, rows]
            if xq.is_cuda and s.cache is not None and triton_ready():
                outs.append(tree_attention(q, k, v, s.tail, layer_cache, s.start))
            else:
                outs.append(attend(q, k, v, s.mask, layer_cache, s.start))
        return torch.cat([o.to(outs[0].dtype) for o in outs], dim=2)


def segments_of(calls: list[dict], device: torch.device) -> tuple[list[Segment], torch.Tensor, torch.Tensor]:
    """The segments of `calls` and their tokens and positions packed into (1, total) rows; refuses a call that
    would overflow its cache."""
    segments, ids, positions, offset = [], [], [], 0
    for c in calls:
        tokens, cache = c["input_ids"], c["cache"]
        if tokens.shape[0] != 1:
            raise ValueError("a packed call holds one sequence (batch 1)")
        q, start = tokens.shape[1], cache.length if cache is not None else 0
        if cache is not None and start + q > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {q} tokens > {cache.max_len} slots")
        pos = c["position_ids"]
        positions.append(pos if pos is not None else torch.arange(start, start + q, device=device)[None])
        tail = c["tree_mask"] if c["tree_mask"] is not None or q == 1 else torch.ones(q, q, dtype=torch.bool,
                                                                                        device=device).tril()
        segments.append(Segment(offset, q, start, cache, attention_mask(q, start, c["tree_mask"], device), tail))
        ids.append(tokens)
        offset += q
    return segments, torch.cat(ids, dim=1), torch.cat(positions, dim=1)


def _advance(segments: list[Segment]) -> None:
    for s in segments:
        if s.cache is not None:
            s.cache.length = s.start + s.q


@torch.inference_mode()
def packed_forward(model: Transformer, calls: list[dict]) -> list[torch.Tensor]:
    """`model(**call)` for every call, computed in one packed forward; each call's `capture` is filled too."""
    segments, ids, positions = segments_of(calls, model.device)
    cos, sin = rope_angles(positions, model.inv_freq, model.dtype)
    x = model.model.embed_tokens(ids)
    kept: dict[int, torch.Tensor] = {}
    wanted = {i for c in calls if c["capture"] is not None for i in c["capture"].layers}
    for i, block in enumerate(model.model.layers):
        x = block(x, cos, sin, SegmentAttention(segments, i), None, 0)
        if i in wanted:
            kept[i] = x
    _advance(segments)
    for c, s in zip(calls, segments):
        if c["capture"] is not None:
            c["capture"].hidden = torch.cat([kept[i][:, s.offset : s.offset + s.q] for i in c["capture"].layers], -1)
    return _lm_head(lambda h: model.lm_head(model.model.norm(h)), x, calls, segments)


def _lm_head(head, x: torch.Tensor, calls: list[dict], segments: list[Segment]) -> list[torch.Tensor]:
    # The LM head only over the rows someone reads: a prefill (`last_only`) wants its last row alone.
    rows = [torch.arange(s.offset + s.q - 1 if c.get("last_only") else s.offset, s.offset + s.q) for c, s in
            zip(calls, segments)]
    logits = head(x[:, torch.cat(rows).to(x.device)])
    out, at = [], 0
    for r in rows:
        out.append(logits[:, at : at + r.numel()])
        at += r.numel()
    return out


@torch.inference_mode()
def packed_head_forward(head, calls: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`head(**call)` (an `Eagle3Head`) for every call, in one packed forward: (logits, hidden out) per call."""
    segments, ids, positions = segments_of(calls, head.device)
    hidden = torch.cat([c["hidden"] for c in calls], dim=1)
    cos, sin = rope_angles(positions, head.inv_freq, head.dtype)
    x = head.midlayer(head.embed_tokens(ids).to(head.dtype), hidden, cos, sin, SegmentAttention(segments, 0), None, 0)
    _advance(segments)
    logits = _lm_head(lambda h: head.lm_head(head.norm(h)), x, calls, segments)
    return [(lg, x[:, s.offset : s.offset + s.q]) for lg, s in zip(logits, segments)]
