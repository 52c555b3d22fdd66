"""Training-time test: an EAGLE-3 head unrolled several steps on its own hidden states, scored against the target.

Alignment (the drafter's, radar.decoding.eagle3): step 1 at index t reads the target's features at t and the
token x_{t+1} (position t + 1) and predicts x_{t+2}. Step k at t reads x_{t+k} and the head's own step k-1 output
at t, as a node k-1 deep in a draft tree reads its parent's, and predicts x_{t+k+1}. Its attention sees what the
drafter's cache holds at that depth: step-1 keys up to t (the committed prefix, drafted from the target's
features) and its own earlier steps at t (its ancestors in the tree). So step k costs one causal attention over L
keys plus k - 1 diagonal terms, not a (kL x kL) mask.

Loss: cross-entropy against the target's distribution restricted to the draft vocabulary (its logits at the draft
ids, softmaxed), i.e. KL to it up to a constant, over answer positions, weighted 0.8^(k-1) per step as EAGLE-3
does. Sums are divided by the global batch's position counts, so the gradient is the same however the batch is
split over workers and micro-batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from radar.cluster.draft_data import Batch
from radar.decoding.eagle3 import Eagle3Head
from radar.decoding.model import apply_rope, rope_angles


def unrolled_attention(q: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention of step-k queries (B, H, L, D) over step-1 keys causally and steps 2..k's keys at the same index."""
    groups = q.shape[1] // past[0][0].shape[1]
    kv = [(k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)) for k, v in past]
    scale = 1.0 / math.sqrt(q.shape[-1])
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = [(q @ kv[0][0].transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))]
    scores += [(q * k).sum(-1, keepdim=True) * scale for k, _ in kv[1:]]
    weights = torch.cat(scores, dim=-1).float().softmax(-1).to(q.dtype)
    out = weights[..., :length] @ kv[0][1]
    for j, (_, v) in enumerate(kv[1:]):
        out = out + weights[..., length + j : length + j + 1] * v
    return out


class Unroll(nn.Module):
    """The head and its training-time-test forward (a module, so DDP sees one forward per step)."""

    def __init__(self, head: Eagle3Head, lm_rows: torch.Tensor, steps: int, decay: float = 0.8):
        super().__init__()
        self.head = head
        self.lm_rows = lm_rows  # (V_draft, H) the target's lm_head rows of the draft vocabulary; frozen, not a buffer
        self.steps = steps
        self.weights = [decay**k for k in range(steps)]

    def layer(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, past: list) -> torch.Tensor:
        """The head's decoder layer for one unroll step (as Eagle3Layer, with the unrolled attention)."""
        mid, head = self.head.midlayer, self.head
        attn = mid.self_attn
        normed = mid.hidden_norm(hidden)
        residual = normed if mid.norm_before_residual else hidden
        x = torch.cat((mid.input_layernorm(head.embed_tokens(ids)), normed), dim=-1)
        b, length, _ = x.shape
        q = attn.q_proj(x).view(b, length, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, attn.n_kv, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, length, attn.n_kv, attn.head_dim).transpose(1, 2)
        cos, sin = rope_angles(positions.expand(b, length), head.inv_freq, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past.append((k, v))
        out = unrolled_attention(q, past)
        x = residual + attn.o_proj(out.transpose(1, 2).reshape(b, length, -1))
        return x + mid.mlp(mid.post_attention_layernorm(x))

    def forward(self, batch: Batch, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, per-step cross-entropy sums, per-step top-1 matches with the target) over the
        batch's scored positions; `totals` are the global batch's scored positions per step."""
        head, length = self.head, batch.features.shape[1]
        hidden = head.project(batch.features.to(head.fc.weight.dtype))
        past: list = []
        loss = hidden.new_zeros((), dtype=torch.float32)
        ce_sums, matches = [], []
        for k in range(1, self.steps + 1):
            cols = slice(k, k + length)
            positions = torch.arange(k, k + length, device=hidden.device)[None]
            hidden = self.layer(batch.ids[:, cols], hidden, positions, past)
            mask = batch.mask[:, cols]
            logits = head.lm_head(head.norm(hidden[mask])).float()
            with torch.no_grad():
                target = (batch.final[:, cols][mask].float() @ self.lm_rows.float().T).softmax(-1)
                top1 = batch.top1[:, cols][mask]
            ce = -(target * F.log_softmax(logits, dim=-1)).sum()
            loss = loss + self.weights[k - 1] * ce / totals[k - 1].clamp(min=1)
            ce_sums.append(ce.detach())
            matches.append((head.target_ids(logits.argmax(-1)) == top1).sum())
        return loss, torch.stack(ce_sums), torch.stack(matches).float()
