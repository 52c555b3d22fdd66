"""The target answering prompts itself, on Ray actors, in fixed shards that a rerun skips (the data a draft head
learns from is the target's own distribution, as EAGLE-3 trains it).

Layout of an output directory (the pattern of radar.cluster.collect: shard i is prompts[i * size : (i + 1) * size],
written atomically by the driver, then listed in the manifest):

    out/manifest.json          the settings and every finished shard
    out/shard-00000.parquet    id, prompt_ids (the chat-rendered prompt), answer_ids (up to and with EOS)

Generation is transformers' batched `generate` with left padding (our engine decodes one sequence at a time, and
batching is what makes answering fast on a CPU); sampling uses the plain distribution (no top-k, no top-p).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from radar.cluster.shards import Shard, make_shards, manifest_text, shard_state
from radar.common.files import write_atomic, write_atomic_with
from radar.common.prompts import Prompt

MANIFEST = "manifest.json"
FORMAT = "radar-answers-manifest/1"


@dataclass(frozen=True)
class AnswerConfig:
    """How the target answers: everything here changes the answers, so a rerun must match it to resume."""

    model: str
    max_new_tokens: int = 192
    temperature: float = 0.0  # 0: greedy
    batch_size: int = 32
    dtype: str = "bfloat16"
    device: str = "cpu"
    shard_size: int = 64
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class AnswerWorker:
    """One loaded target answering shards of prompts (the body of the Ray actor)."""

    def __init__(self, config: dict, threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self.config = AnswerConfig(**config)
        dtype = getattr(torch, self.config.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=dtype).to(self.config.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model, padding_side="left")
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos, default=0)

    def encode(self, text: str) -> list[int]:
        """The prompt as the target sees it in chat: its template (or the plain layout) and special tokens."""
        from radar.decoding.chat import render_chat

        rendered, special = render_chat(self.tokenizer, text)
        return self.tokenizer(rendered, add_special_tokens=special)["input_ids"]

    def answer(self, shard: Shard) -> tuple[int, list[dict], str]:
        """(shard index, one row per prompt in prompt order, pid@host)."""
        import torch

        cfg = self.config
        encoded = [self.encode(p.text) for p in shard.prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch with less padding
        answers: dict[int, list[int]] = {}
        torch.manual_seed(cfg.seed + shard.index)
        for lo in range(0, len(order), cfg.batch_size):
            batch = order[lo : lo + cfg.batch_size]
            for i, ids in zip(batch, self.generate([encoded[i] for i in batch])):
                answers[i] = ids
        rows = [{"id": p.id, "prompt_ids": encoded[i], "answer_ids": answers[i]} for i, p in enumerate(shard.prompts)]
        return shard.index, rows, f"{os.getpid()}@{socket.gethostname()}"

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """Answers to a batch of token-id prompts, each cut after its first EOS."""
        import torch

        cfg = self.config
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=cfg.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=cfg.device)
        kwargs = dict(do_sample=False) if cfg.temperature == 0 else dict(
            do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                      pad_token_id=self.pad, **kwargs)
        answers = []
        for row in out[:, width:].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in self.eos), len(row))
            answers.append(row[:end])
        return answers


def open_manifest(out: Path, config: AnswerConfig) -> dict:
    """The directory's manifest, or a new one; ValueError when it was answered with other settings."""
    import json

    path = out / MANIFEST
    if not path.exists():
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; give a directory for the answers")
        return {"format": FORMAT, "config": config.to_dict(), "shards": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a radar answers manifest (format {FORMAT})")
    diff = [f"{k}: {manifest['config'].get(k)!r} there, {v!r} now" for k, v in config.to_dict().items()
            if manifest["config"].get(k) != v]
    if diff:
        raise ValueError(f"{out} was answered with other settings ({'; '.join(diff)}); use a new directory")
    return manifest


def answer_prompts(
    prompts: Sequence[Prompt],
    out: str | Path,
    config: AnswerConfig,
    *,
    workers: int = 1,
    local: bool = False,
    cpus_per_worker: float = 1.0,
    progress: bool = True,
    desc: str = "answers",
) -> dict:
    """Answer `prompts` into shards under `out`, skipping the shards a previous run finished; returns the
    manifest. `local` answers in this process; otherwise `workers` Ray actors share the shards."""
    from tqdm.auto import tqdm

    out = Path(out)
    if not prompts:
        raise ValueError("no prompts to answer")
    manifest = open_manifest(out, config)
    shards = make_shards(list(prompts), config.shard_size)
    todo = [s for s in shards if shard_state(out, s, manifest["shards"].get(str(s.index))) == "todo"]
    bar = tqdm(total=sum(len(s.prompts) for s in todo), unit="prompt", desc=desc, disable=not progress or not todo)
    started = time.perf_counter()

    def save(index: int, rows: list[dict], where: str) -> None:
        shard = shards[index]
        write_rows(rows, out / shard.file)
        tokens = sum(len(r["answer_ids"]) for r in rows)
        manifest["shards"][str(index)] = {"file": shard.file, "prompts": shard.fingerprint, "answers": len(rows),
                                          "answer_tokens": tokens, "worker": where}
        write_atomic(out / MANIFEST, manifest_text(manifest))  # after the file: a listed shard has its file
        bar.update(len(rows))
        bar.set_postfix(tokens=sum(e["answer_tokens"] for e in manifest["shards"].values()))

    try:
        if todo and local:
            import torch

            worker = AnswerWorker(config.to_dict(), threads=torch.get_num_threads())
            for shard in todo:
                save(*worker.answer(shard))
        elif todo:
            run_actors(config, todo, min(workers, len(todo)), cpus_per_worker, save)
    finally:
        bar.close()
    manifest["seconds_this_run"] = time.perf_counter() - started
    return manifest


def run_actors(config: AnswerConfig, todo: list[Shard], n: int, cpus: float, save) -> None:
    """Spread the shards over `n` actors (a restarted actor redoes its shard), saving each as it comes back."""
    import ray
    from ray.util import ActorPool

    gpu = config.device.startswith("cuda")
    resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus}
    remote = ray.remote(AnswerWorker).options(**resources, max_restarts=2, max_task_retries=2)
    actors = [remote.remote(config.to_dict(), threads=1 if gpu else max(1, int(cpus))) for _ in range(n)]
    try:
        for result in ActorPool(actors).map_unordered(lambda actor, shard: actor.answer.remote(shard), todo):
            save(*result)
    finally:
        for actor in actors:
            ray.kill(actor)


def write_rows(rows: list[dict], path: Path) -> None:
    """One shard's answers as Parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.string()), ("prompt_ids", pa.list_(pa.int32())), ("answer_ids", pa.list_(pa.int32()))]))
    write_atomic_with(path, lambda tmp: pq.write_table(table, tmp))


def read_answers(out: str | Path) -> list[dict]:
    """Every finished shard's rows, in shard order (rows: id, prompt_ids, answer_ids)."""
    import json

    import pyarrow.parquet as pq

    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    rows: list[dict] = []
    for index in sorted(manifest["shards"], key=int):
        rows.extend(pq.read_table(out / manifest["shards"][index]["file"]).to_pylist())
    return rows
