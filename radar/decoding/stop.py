"""Stop policies: before every draft call after the first, `decide(calls_so_far, frontier_scores)` says whether
the cycle keeps drafting (`radar.decoding.tree.draft_pool` asks). The rules here need no learning: EAGLE's fixed
depth and a confidence threshold. The learned RADAR controller (`radar.controller.policy.ControllerPolicy`)
implements the same protocol.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class StopPolicy(Protocol):
    """Decides before each draft call (after the first) whether to keep drafting this cycle."""

    def reset(self) -> None:
        """Start a new cycle (called before its first draft call)."""

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        """After `calls` draft calls, with the frontier's cumulative log-probs: True to make one more call."""

    # Optional: `choose_budget(calls, frontier_scores) -> int | None`, asked once drafting has ended, picks how many
    # tree tokens the target verifies this cycle (`build_tree`); the controller has one. And `drafts: bool`: False
    # makes `ModelPair.generate` decode with the target alone (a controller trained where drafting does not pay).


class FixedDepth:
    """Always make exactly `depth` draft calls (EAGLE's fixed schedule)."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth = depth

    def reset(self) -> None:
        """Nothing to reset: the rule has no state."""

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        """Continue until `depth` calls are made."""
        return calls < self.depth


class ThresholdPolicy:
    """Confidence-threshold baseline: keep drafting while exp(best frontier cumulative log-prob) >= threshold.

    threshold <= 0 never stops (always t_max calls); threshold > 1 always stops after the first call.
    """

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.log_threshold = math.log(self.threshold) if self.threshold > 0 else -math.inf

    def reset(self) -> None:
        """Nothing to reset: the rule has no state."""

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        """Continue while the most likely frontier path is at least `threshold` likely."""
        return bool(frontier_scores.max() >= self.log_threshold)

