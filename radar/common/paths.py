"""Where radar keeps what it builds or downloads once and reuses: $RADAR_HOME, else $XDG_CACHE_HOME/radar, else
~/.cache/radar."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root, or the named folder below it (not created)."""
    if os.environ.get("RADAR_HOME"):
        root = Path(os.environ["RADAR_HOME"]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "radar"
    return root.joinpath(*parts)
