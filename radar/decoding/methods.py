"""The method grammar every entry point shares: how to decode one request."""

from __future__ import annotations

import re
from dataclasses import dataclass

_GRAMMAR = re.compile(r"(ar|off|radar)|(chain|tree):(\d+)")


@dataclass(frozen=True)
class Method:
    """How to decode: `ar` (the target alone; `off` is a synonym), `chain:D` (one draft per call, D calls),
    `tree:D` (dynamic tree, D calls) or `radar` (dynamic tree, a learned stop policy decides before each draft
    call, up to the tree's `max_calls`)."""

    kind: str  # "ar", "chain", "tree" or "radar"
    depth: int = 0

    @classmethod
    def parse(cls, text: str) -> "Method":
        """Parse `ar`, `off`, `radar`, `chain:D` or `tree:D` (D >= 1); a ValueError names the grammar."""
        m = _GRAMMAR.fullmatch(text.strip())
        if not m or (m.group(3) and int(m.group(3)) < 1):
            raise ValueError(f"unknown method {text!r}: use ar, radar, chain:D or tree:D with D >= 1")
        if m.group(1):
            return cls("ar" if m.group(1) == "off" else m.group(1))
        return cls(m.group(2), int(m.group(3)))

    @property
    def speculative(self) -> bool:
        """Whether the method drafts (everything but `ar`)."""
        return self.kind != "ar"

    def __str__(self) -> str:
        return self.kind if self.kind in ("ar", "radar") else f"{self.kind}:{self.depth}"
