"""The method grammar every entry point shares: how to decode one request."""

from __future__ import annotations

import re
from dataclasses import dataclass

_GRAMMAR = re.compile(r"(ar|off|radar)|(chain|tree):(\d+)|threshold:(\d*\.?\d+(?:[eE]-?\d+)?)")
_BUDGET = re.compile(r"(.*)@(\d+)")


@dataclass(frozen=True)
class Method:
    """How to decode: `ar` (the target alone; `off` is a synonym), `chain:D` (one draft per call, D calls),
    `tree:D` (dynamic tree, D calls), `threshold:P` (dynamic tree, drafting on while the best frontier node's
    probability is at least P, the rule a sceptic tries first) or `radar` (dynamic tree, a learned stop policy
    decides before each draft call); the last two stop at the tree's `max_calls`. `tree:D@B` and `threshold:P@B`
    verify B tree tokens per cycle instead of the pair's budget."""

    kind: str  # "ar", "chain", "tree", "threshold" or "radar"
    depth: int = 0
    threshold: float = 0.0  # P of threshold:P
    budget: int | None = None  # B of tree:D@B and threshold:P@B: tree tokens verified per cycle

    @classmethod
    def parse(cls, text: str) -> "Method":
        """Parse `ar`, `off`, `radar`, `chain:D`, `tree:D` (D >= 1) or `threshold:P` (P >= 0: 0 never stops, above 1
        always stops after one call); a ValueError names the grammar."""
        body, budget = text.strip(), None
        b = _BUDGET.fullmatch(body)
        if b:
            body, budget = b.group(1), int(b.group(2))
        m = _GRAMMAR.fullmatch(body)
        bad_budget = budget is not None and (budget < 1 or not m or not (m.group(4) or m.group(2) == "tree"))
        if not m or (m.group(3) and int(m.group(3)) < 1) or bad_budget:
            raise ValueError(f"unknown method {text!r}: use ar, radar, chain:D or tree:D with D >= 1, or "
                             "threshold:P with P >= 0; tree:D@B and threshold:P@B verify B >= 1 tree tokens")
        if m.group(1):
            return cls("ar" if m.group(1) == "off" else m.group(1))
        if m.group(4):
            return cls("threshold", threshold=float(m.group(4)), budget=budget)
        return cls(m.group(2), int(m.group(3)), budget=budget)

    @property
    def speculative(self) -> bool:
        """Whether the method drafts (everything but `ar`)."""
        return self.kind != "ar"

    def __str__(self) -> str:
        at = "" if self.budget is None else f"@{self.budget}"
        if self.kind == "threshold":
            return f"threshold:{self.threshold:g}{at}"
        return self.kind if self.kind in ("ar", "radar") else f"{self.kind}:{self.depth}{at}"
