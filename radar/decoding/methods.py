"""The method grammar every entry point shares: how to decode one request."""

from __future__ import annotations

import re
from dataclasses import dataclass

_GRAMMAR = re.compile(r"(ar|off|radar)|(chain|tree):(\d+)|threshold:(\d*\.?\d+(?:[eE]-?\d+)?)")


@dataclass(frozen=True)
class Method:
    """How to decode: `ar` (the target alone; `off` is a synonym), `chain:D` (one draft per call, D calls),
    `tree:D` (dynamic tree, D calls), `threshold:P` (dynamic tree, drafting on while the best frontier node's
    probability is at least P, the rule a sceptic tries first) or `radar` (dynamic tree, a learned stop policy
    decides before each draft call); the last two stop at the tree's `max_calls`."""

    kind: str  # "ar", "chain", "tree", "threshold" or "radar"
    depth: int = 0
    threshold: float = 0.0  # P of threshold:P

    @classmethod
    def parse(cls, text: str) -> "Method":
        """Parse `ar`, `off`, `radar`, `chain:D`, `tree:D` (D >= 1) or `threshold:P` (P >= 0: 0 never stops, above 1
        always stops after one call); a ValueError names the grammar."""
        m = _GRAMMAR.fullmatch(text.strip())
        if not m or (m.group(3) and int(m.group(3)) < 1):
            raise ValueError(f"unknown method {text!r}: use ar, radar, chain:D or tree:D with D >= 1, or "
                             "threshold:P with P >= 0")
        if m.group(1):
            return cls("ar" if m.group(1) == "off" else m.group(1))
        if m.group(4):
            return cls("threshold", threshold=float(m.group(4)))
        return cls(m.group(2), int(m.group(3)))

    @property
    def speculative(self) -> bool:
        """Whether the method drafts (everything but `ar`)."""
        return self.kind != "ar"

    def __str__(self) -> str:
        if self.kind == "threshold":
            return f"threshold:{self.threshold:g}"
        return self.kind if self.kind in ("ar", "radar") else f"{self.kind}:{self.depth}"
