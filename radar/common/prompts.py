"""Prompt sets: the bundled benchmarks (MT-bench, GSM8K, Alpaca, MBPP) and any user jsonl.

A line is either `{"prompt": "..."}` or the FastChat question format `{"question_id": ..., "turns": ["...", ...]}`
(the first turn is the prompt). Blank lines are skipped; anything else is an error naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BUNDLED = ("mt_bench", "gsm8k", "alpaca", "mbpp")


class PromptFileError(ValueError):
    """A prompt file is missing, empty or has a malformed line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    source: str  # the set's name or the file's path


def bundled_path(name: str) -> Path:
    """Path of a bundled prompt set by name (mt_bench, gsm8k, alpaca, mbpp)."""
    return Path(str(resources.files("radar") / "data" / "prompts" / f"{name}.jsonl"))


def resolve(spec: str | Path) -> Path:
    """A bundled set's name, or a path to a jsonl file."""
    if str(spec) in BUNDLED:
        return bundled_path(str(spec))
    path = Path(spec)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path} (or name a bundled set: {', '.join(BUNDLED)})")
    return path


def load_prompts(spec: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read a prompt set; `limit` keeps the first N. `a+b` joins sets (the first `limit` of each), their ids
    prefixed with the set's name since sets reuse ids."""
    parts = str(spec).split("+")
    if len(parts) > 1 and all(parts) and str(spec) not in BUNDLED and not Path(spec).is_file():
        return [Prompt(f"{part}/{p.id}", p.text, p.source) for part in parts for p in load_prompts(part, limit)]
    path = resolve(spec)
    source = str(spec) if str(spec) in BUNDLED else str(path)
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            prompts.append(_parse(line, f"{path}:{lineno}", source, len(prompts)))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in the file")
    return prompts


def _parse(line: str, where: str, source: str, index: int) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object with a 'prompt' or 'turns' field")
    if "prompt" in row:
        text = row["prompt"]
    elif isinstance(row.get("turns"), list) and row["turns"]:
        text = row["turns"][0]
    else:
        raise PromptFileError(f"{where}: expected a 'prompt' string or a non-empty 'turns' list")
    if not isinstance(text, str) or not text.strip():
        raise PromptFileError(f"{where}: the prompt must be a non-empty string")
    pid = row.get("id", row.get("question_id", index))
    return Prompt(id=str(pid), text=text, source=source)
