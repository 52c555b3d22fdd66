"""Building the demo pair into the cache, atomically: a complete build is reused, a stale one replaced."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from radar.common.files import new_dir
from radar.common.paths import cache_dir
from radar.decoding.model import Transformer
from radar.ops.demo_pair.config import BOS, EOS, MANIFEST, MODEL_FILES, DemoConfig
from radar.ops.demo_pair.corpus import build_corpus, encode_documents, save_tokenizer, train_tokenizer
from radar.ops.demo_pair.training import (distill_draft, evaluate_pair, heldout_loss, init_draft, init_weights,
                                          n_params, onpolicy_pool, train_target)


def build_demo_pair(out_dir: str | Path, cfg: DemoConfig | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Build the pair into `out_dir`/target and `out_dir`/draft (Hugging Face format, tokenizer in both),
    with `out_dir`/demo.json describing the build. Returns (target_dir, draft_dir)."""
    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _build(out_dir, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, cfg: DemoConfig, progress: bool) -> tuple[Path, Path]:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train_docs, held_docs = build_corpus(cfg)
    times["corpus_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    tok = train_tokenizer(train_docs, cfg)
    train_ids, held_ids = encode_documents(tok, train_docs), encode_documents(tok, held_docs)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    times["tokenizer_s"] = time.perf_counter() - t
    if len(train_ids) <= cfg.seq_len + 1 or len(held_ids) < 16:
        raise ValueError(
            f"corpus too small ({len(train_ids)} training tokens) for seq_len {cfg.seq_len}: raise max_corpus_chars"
        )

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t = time.perf_counter()
    target = Transformer(cfg.model_config(cfg.target_layers, bos, eos))
    init_weights(target)
    target_loss = train_target(target, train_ids, cfg, gen, progress)
    losses = {"target_train_ce": target_loss, "target_heldout_ce": heldout_loss(target, held_ids, cfg)}
    with torch.no_grad():
        target.lm_head.weight.mul_(cfg.logit_scale)
    losses["target_heldout_ce_saved"] = heldout_loss(target, held_ids, cfg)
    times["target_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    draft = init_draft(target, cfg, bos, eos)
    pool = onpolicy_pool(target, train_ids, tok, cfg, gen, progress)
    times["draft_data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    losses["draft_train_kl"] = distill_draft(draft, target, train_ids, pool, cfg, gen, progress)
    times["draft_train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = evaluate_pair(target, draft, held_ids, tok, cfg)
    times["eval_s"] = time.perf_counter() - t

    target_dir, draft_dir = out_dir / "target", out_dir / "draft"
    for model, path in ((target, target_dir), (draft, draft_dir)):
        model.save_pretrained(path)
        save_tokenizer(tok, path, cfg)
    times["total_s"] = time.perf_counter() - t0
    manifest = {
        "config": asdict(cfg),
        "seed": cfg.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "corpus": {
            "train_documents": len(train_docs),
            "heldout_documents": len(held_docs),
            "train_chars": sum(map(len, train_docs)),
            "train_tokens": len(train_ids),
            "heldout_tokens": len(held_ids),
            "sha256": hashlib.sha256("\x00".join(train_docs).encode()).hexdigest(),
        },
        "params": {"target": n_params(target), "draft": n_params(draft)},
        "tokens_seen": {
            "target": cfg.target_steps * cfg.batch_size * cfg.seq_len,
            "draft": cfg.draft_steps * cfg.batch_size * cfg.seq_len,
        },
        "final_losses": losses,
        "metrics": metrics,
        "times": times,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target_dir, draft_dir


# ---------------------------------------------------------------------------------------------- the cached pair


def default_demo_dir() -> Path:
    """Where the demo pair is cached (`cache_dir("demo")`)."""
    return cache_dir("demo")


def _is_complete(path: Path, cfg: DemoConfig) -> bool:
    """Both model directories are whole and demo.json says they were built with `cfg`."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("config") != json.loads(json.dumps(asdict(cfg))):
        return False
    return all((path / sub / f).is_file() for sub in ("target", "draft") for f in MODEL_FILES)


def ensure_demo_pair(
    cfg: DemoConfig | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the demo pair in `out_dir` (default: `default_demo_dir()`), built first when it
    is missing, incomplete or was built with another config. The build goes to a temporary sibling directory that
    is renamed into place only when complete."""
    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir()
    if _is_complete(out_dir, cfg):
        return out_dir / "target", out_dir / "draft"
    try:
        with new_dir(out_dir) as tmp:
            build_demo_pair(tmp, cfg, progress=progress)
    except OSError:
        if not _is_complete(out_dir, cfg):  # anything but another process having finished the same build
            raise
    return out_dir / "target", out_dir / "draft"


def load_manifest(out_dir: str | Path | None = None) -> dict:
    """The demo.json of a built pair."""
    return json.loads((Path(out_dir) if out_dir is not None else default_demo_dir()).joinpath(MANIFEST).read_text())
