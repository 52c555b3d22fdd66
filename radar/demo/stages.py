"""Stage bookkeeping of the demo pipeline: a manifest (WORK/stages.json) records, per stage, the inputs it ran with
(its settings and digests of the upstream outputs it read), its outputs and their digest, its status and its
duration. A stage is skipped when its entry is done, its inputs are the same and its outputs are still there
unchanged; otherwise it runs, and every stage after it sees a new upstream digest and runs too."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from radar.cluster.shards import MANIFEST as COLLECT_MANIFEST
from radar.common.files import write_atomic
from radar.controller.policy import CONFIG_FILE, WEIGHTS_FILE

STAGES = ("pair", "costs", "collect", "train", "tune", "register", "bench")
MANIFEST = "stages.json"
MANIFEST_FORMAT = "radar-demo-stages/5"  # 2: inputs keyed by the operations' configs; 3: the resolved dtype;
# 4: the resolved precision (gguf among them) and the tree it implies; 5: records of schema 2 (pool nodes), costs with
# the verification curve, a budget head, rules as champions


class StageError(RuntimeError):
    """A stage failed; the stages before it are done and kept, and a rerun resumes from this one."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {cause}")
        self.stage, self.cause = stage, cause


@dataclass
class StageReport:
    """How one stage went in this run."""

    name: str
    status: str  # "done", "skipped" or "failed"
    seconds: float
    summary: str = ""


def digest(data: bytes) -> str:
    """A short hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()[:16]


def inputs_key(inputs: dict) -> str:
    """The digest a stage's inputs are compared by."""
    return digest(json.dumps(inputs, sort_keys=True, default=str).encode())


def content_digest(paths: list[Path]) -> str | None:
    """Digest of the named files' contents (None when one is missing)."""
    h = hashlib.sha256()
    for p in paths:
        if not p.is_file():
            return None
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stat_digest(dirs: list[Path]) -> str:
    """Digest of the files' names, sizes and modification times in each directory: cheap for multi-GB checkpoints,
    and changed by any rebuild."""
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            st = f.stat()
            h.update(f"{d.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def controller_digest(path: Path) -> str | None:
    """Digest of a saved controller's files."""
    return content_digest([path / CONFIG_FILE, path / WEIGHTS_FILE])


def records_digest(path: Path) -> str | None:
    """The collection's manifest plus every shard's name and size (the manifest lists the finished shards)."""
    manifest = path / COLLECT_MANIFEST
    if not manifest.is_file():
        return None
    shards = "".join(f"{f.name}:{f.stat().st_size}\n" for f in sorted(path.glob("*.parquet")))
    return digest(manifest.read_bytes() + shards.encode())


def stderr_log(line: str) -> None:
    """The default progress log: one line on stderr."""
    print(line, file=sys.stderr, flush=True)


class StageLog:
    """The manifest of one work directory, and how each stage of this run went."""

    def __init__(self, work: Path, fresh: bool, log: Callable[[str], None]):
        self.work, self.fresh, self.log = work, fresh, log
        self.reports: list[StageReport] = []
        self.manifest: dict = {"format": MANIFEST_FORMAT, "stages": {}}

    def load(self) -> None:
        """Read the manifest a previous run left (unless `fresh`)."""
        path = self.work / MANIFEST
        if path.exists() and not self.fresh:
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                data = None
            if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT:
                self.manifest = data
            else:  # unreadable: every stage reruns (outputs are replaced atomically, nothing is lost)
                self.log(f"{path} is not a demo stage manifest; running every stage")

    def record(self, name: str, entry: dict) -> None:
        """Store a stage's entry and rewrite the manifest atomically."""
        self.manifest["stages"][name] = entry
        write_atomic(self.work / MANIFEST, json.dumps(self.manifest, indent=1, default=str) + "\n")

    def run(
        self,
        name: str,
        inputs: dict,
        body: Callable[[bool], dict],
        check: Callable[[dict], bool],
        start: str = "",
        summary: Callable[[dict], str] = lambda o: "",
        clean: Callable[[], None] | None = None,
    ) -> dict:
        """Skip stage `name` when it is done with these inputs and `check(outputs)` holds; else run it: `body(resume)`
        returns the outputs (`resume`: an earlier attempt with the same inputs left work to reuse). `clean` removes
        partial work of other inputs first."""
        index = STAGES.index(name) + 1
        tag = f"[{index}/{len(STAGES)}] {name}"
        key = inputs_key(inputs)
        entry = self.manifest["stages"].get(name)
        if entry and entry.get("status") == "done" and entry.get("key") == key and check(entry["outputs"]):
            self.log(f"{tag}: skipped (done)")
            self.reports.append(StageReport(name, "skipped", 0.0, summary(entry["outputs"])))
            return entry["outputs"]
        resume = bool(entry) and entry.get("key") == key
        if not resume and clean is not None:
            clean()
        self.log(f"{tag}: {start or 'running'} ...")
        base = {"key": key, "inputs": inputs, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.record(name, {**base, "status": "running"})
        t0 = time.perf_counter()
        try:
            outputs = body(resume)
        except BaseException as exc:
            seconds = time.perf_counter() - t0
            self.record(name, {**base, "status": "failed", "seconds": round(seconds, 2),
                                "error": f"{type(exc).__name__}: {exc}"})
            self.log(f"{tag}: FAILED after {seconds:.1f}s: {type(exc).__name__}: {exc}")
            self.reports.append(StageReport(name, "failed", seconds, str(exc)))
            if isinstance(exc, Exception):
                raise StageError(name, exc) from exc
            raise  # KeyboardInterrupt and friends stay what they are
        seconds = time.perf_counter() - t0
        self.record(name, {**base, "status": "done", "seconds": round(seconds, 2), "outputs": outputs})
        text = summary(outputs)
        self.log(f"{tag}: done in {seconds:.1f}s" + (f" ({text})" if text else ""))
        self.reports.append(StageReport(name, "done", seconds, text))
        return outputs
