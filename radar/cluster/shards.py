"""The collection's unit of work and of resume: prompts cut into fixed shards, and the manifest that lists the
finished ones with the settings they were collected with (see radar.cluster.collect for the run)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from radar.common.prompts import Prompt
from radar.controller.dataset import SCHEMA_VERSION, shard_files

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "radar-collect-manifest/1"
# Settings that change what the records are: a rerun must match all of them to add to a directory.
CONFIG_KEYS = ("prompts", "model", "draft", "t_max", "k", "total_tokens", "temperature", "max_new_tokens", "seed",
               "device", "dtype", "shard_size", "schema_version")


class CollectError(RuntimeError):
    """The run could not finish (workers died); the shards it finished are kept."""


@dataclass(frozen=True)
class CollectConfig:
    """What a collection run makes; `device`, `dtype` and `total_tokens` are resolved before the run starts."""

    model: str
    draft: str
    prompts: str = "mt_bench"  # the prompt set's name or file, as given
    t_max: int = 8
    k: int = 10
    total_tokens: int | None = None  # None: the device's default tree budget
    temperature: float = 0.0
    max_new_tokens: int = 128
    seed: int = 0
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "auto"
    shard_size: int = 8
    schema_version: int = SCHEMA_VERSION

    def check(self) -> None:
        """Raise ValueError for settings no run can use."""
        if self.t_max < 1 or self.k < 1:
            raise ValueError("t_max and k must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device {self.device!r}: use auto, cpu or cuda")

    def resolved(self, gpu: bool) -> "CollectConfig":
        """The config with auto settings fixed: the device the workers get (cuda when `gpu`), its dtype and tree
        budget. Stored in the manifest, so a resumed run on other hardware cannot silently change them."""
        import torch

        from radar.decoding.pair import default_tree, resolve_precision

        device = ("cuda" if gpu else "cpu") if self.device == "auto" else self.device.split(":")[0]
        precision = resolve_precision(self.dtype, torch.device(device), self.model)
        tree = default_tree(torch.device(device), precision)
        total = self.total_tokens if self.total_tokens is not None else tree.total_tokens
        return replace(self, device=device, dtype=precision, total_tokens=total)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shard:
    """A fixed chunk of prompts: shard `index` holds prompts[index * size : (index + 1) * size]."""

    index: int
    prompts: tuple[Prompt, ...]

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.parquet"

    @property
    def fingerprint(self) -> list[list[str]]:
        """[id, hash of text] per prompt: what the manifest compares on a rerun."""
        return [[p.id, hashlib.sha256(p.text.encode()).hexdigest()[:16]] for p in self.prompts]


@dataclass
class CollectSummary:
    """What a run did: shards and records in the directory, and how many of them this run made."""

    out: Path
    shards: int
    shards_skipped: int
    shards_run: int
    records: int  # in the directory, over all finished shards
    records_run: int
    prompts_run: int
    workers: int
    seconds: float
    config: dict = field(default_factory=dict)


def make_shards(prompts: Sequence[Prompt], shard_size: int) -> list[Shard]:
    """Cut the prompt list into fixed, index-identified shards."""
    return [Shard(i // shard_size, tuple(prompts[i: i + shard_size])) for i in range(0, len(prompts), shard_size)]


# ---- the manifest ---------------------------------------------------------------------------------------


def manifest_text(manifest: dict) -> str:
    """The manifest as JSON with one line per shard (readable and diffable)."""
    entries = sorted(manifest["shards"].items(), key=lambda item: int(item[0]))  # by index, not completion order
    shards = ",\n".join(f"  {json.dumps(key)}: {json.dumps(entry)}" for key, entry in entries)
    head = {k: v for k, v in manifest.items() if k != "shards"}
    return json.dumps(head, indent=1)[:-2] + ',\n "shards": {\n' + shards + "\n }\n}\n"


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of a collection directory, or None when there is none."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}); it is not a radar collection manifest") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a radar collection manifest (format {MANIFEST_FORMAT})")
    return data


def open_manifest(out: Path, config: CollectConfig) -> dict:
    """The directory's manifest, or a new one for `config` (written with the first shard, so a run that fails
    before any shard, e.g. on a wrong model path, leaves nothing to mismatch); ValueError when the directory was
    collected with another config."""
    manifest = read_manifest(out)
    wanted = {key: config.to_dict()[key] for key in CONFIG_KEYS}
    if manifest is None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a directory for the shards")
        if out.exists() and shard_files(out):
            raise ValueError(f"{out} already holds Parquet files but no {MANIFEST}; collect into a new directory")
        return {"format": MANIFEST_FORMAT, "config": wanted, "shards": {}}
    have = manifest.get("config", {})
    diff = [f"{key}: {have.get(key)!r} there, {wanted[key]!r} now" for key in CONFIG_KEYS if have.get(key) != wanted[key]]
    if diff:
        raise ValueError(f"{out} was collected with other settings ({'; '.join(diff)}); "
                         "use a new --out directory or the same settings")
    return manifest


def shard_state(out: Path, shard: Shard, entry: dict | None) -> str:
    """'done', 'todo' or raise: compare a shard with what the manifest says was collected for its index."""
    if entry is None or not (out / entry["file"]).exists():
        return "todo"
    have, now = entry["prompts"], shard.fingerprint
    if have[: len(now)] == now:
        return "done"  # the same prompts (or, after a smaller --limit, more of them)
    if now[: len(have)] == have:
        return "todo"  # a larger --limit grew the last shard: redo it whole, replacing its file
    pos = next(i for i, (a, b) in enumerate(zip(have, now)) if a != b)
    what = "text" if have[pos][0] == now[pos][0] else f"id ({have[pos][0]!r} there, {now[pos][0]!r} now)"
    raise ValueError(f"{out}: shard {shard.index} was collected from other prompts (its prompt {pos + 1} has another "
                     f"{what}); use a new --out directory")
