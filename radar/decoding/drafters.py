"""Drafters: whatever proposes draft tokens. One implementation today, a separate small causal LM.

The interface is what the tree builder needs: feed tokens (with a tree mask over the nodes fed so far this
cycle) and get next-token log-probs back, then keep only the accepted path once the target has verified.
An EAGLE-3 head would implement the same three methods, taking the target's hidden states through
`observe_target` (the seam; the small-LM drafter ignores them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from radar.decoding.model import Transformer


class Drafter(ABC):
    """Proposes next-token log-probs for draft tree nodes and keeps its own per-sequence state."""

    vocab_size: int

    @abstractmethod
    def begin(self, max_len: int) -> None:
        """Start a new sequence with room for `max_len` tokens."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of tokens (committed prefix plus tree nodes fed this cycle) in the drafter's state."""

    @abstractmethod
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor | None) -> torch.Tensor:
        """Log-probs (Q, V) of the next token after each of `tokens` (Q,), appending them to the state."""

    @abstractmethod
    def keep(self, start: int, slots: list[int]) -> None:
        """Keep state [0, start) and the given later slots in order; drop the rest."""

    def observe_target(self, hidden: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Receive the target's hidden states for the accepted tokens (used by feature-level drafters)."""


class SmallLMDrafter(Drafter):
    """A separate small causal LM sharing the target's tokenizer, with its own KV cache."""

    def __init__(self, model: Transformer):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.cache = None

    def begin(self, max_len: int) -> None:
        self.cache = self.model.new_cache(max_len)

    @property
    def length(self) -> int:
        return self.cache.length

    def forward(self, tokens, positions, tree_mask):
        logits = self.model(tokens[None], positions[None], self.cache, tree_mask)[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def keep(self, start, slots):
        self.cache.keep(start, slots)
