"""The controller's input: a frontier's cumulative draft log-probs turned into a fixed-size state s_t.

Collection (dataset states), the PyTorch policy and the compiled CPU step all build states this one way, so a
controller sees live exactly what it was trained on.
"""

from __future__ import annotations

import torch

# A frontier narrower than k (vocabulary smaller than k) is padded with this "no probability" score, and scores
# below it (including -inf) are clamped to it. It stays finite because the head reads the raw state: a huge
# negative input would swing the logits, while exp(-100) is already zero for every purpose here.
PAD_LOGPROB = -100.0


def frontier_state(frontier_scores: torch.Tensor, k: int) -> torch.Tensor:
    """The controller's input from a frontier's scores: float32, sorted descending, clamped to `PAD_LOGPROB`,
    truncated or padded (with `PAD_LOGPROB`) to exactly k. Collection must build dataset states with this too."""
    s = frontier_scores.detach().float().flatten()
    s = torch.nan_to_num(s, nan=PAD_LOGPROB, neginf=PAD_LOGPROB).clamp_min(PAD_LOGPROB)
    s = s.sort(descending=True).values[:k]
    if s.numel() < k:
        s = torch.cat((s, s.new_full((k - s.numel(),), PAD_LOGPROB)))
    return s
