"""Drafters: whatever proposes draft tokens. A separate small causal LM here; an EAGLE-3 head in eagle3.py.

The interface is what the tree builder needs: feed tokens (with a tree mask over the nodes fed so far this
cycle) and get next-token log-probs back, then keep only the accepted path once the target has verified.
A drafter may read its own vocabulary (`target_ids` maps its token ids to the target's) and may read the
target's hidden states: it names the layers in `capture`, and the loop hands it their outputs for every committed
token through `observe_target` before the forward that feeds the tokens after them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from radar.decoding.model import Transformer


class Drafter(ABC):
    """Proposes next-token log-probs for draft tree nodes and keeps its own per-sequence state."""

    vocab_size: int  # of the drafter's own vocabulary, which `forward`'s log-probs cover
    capture: tuple[int, ...] | None = None  # target layers whose outputs the drafter reads; None: it reads none

    @abstractmethod
    def begin(self, max_len: int) -> None:
        """Start a new sequence with room for `max_len` tokens."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of tokens (committed prefix plus tree nodes fed this cycle) in the drafter's state."""

    @abstractmethod
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor | None) -> torch.Tensor:
        """Log-probs of the next token, appending `tokens` (Q, target ids) to the state. Without `tree_mask` the
        tokens are committed ones, causal, and the log-probs (1, vocab_size) are those after the last of them; with
        it (Q, T) the log-probs (Q, vocab_size) are those after each token, the tokens are tree nodes and its
        columns are the last T slots, this cycle's tree nodes (the new ones last): a node's parent is the latest
        tree slot it sees, or the last committed token when it sees none."""

    @abstractmethod
    def keep(self, start: int, slots: list[int]) -> None:
        """Keep state [0, start) and the given later slots in order; drop the rest."""

    def target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's token ids for ids of the drafter's vocabulary (the same ids unless it has its own)."""
        return ids

    def observe_target(self, hidden: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Receive the `capture` layers' outputs (N, C) for the next N committed tokens, in order."""


class SmallLMDrafter(Drafter):
    """A separate small causal LM sharing the target's tokenizer, with its own KV cache."""

    def __init__(self, model: Transformer):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.cache = None

    def begin(self, max_len: int) -> None:
        self.cache = self.model.new_cache(max_len, exact=False)  # a draft's rounding costs nothing but acceptance

    @property
    def length(self) -> int:
        return self.cache.length

    def forward(self, tokens, positions, tree_mask):
        logits = self.model(tokens[None], positions[None], self.cache, tree_mask, last_only=tree_mask is None)[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def keep(self, start, slots):
        self.cache.keep(start, slots)
