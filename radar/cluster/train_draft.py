"""Training an EAGLE-3 head on Ray Train: `TorchTrainer` workers with DDP (gloo on CPUs, one GPU each on a cluster).

Every worker reads the same features file and walks the same seeded sequence of global batches; worker r takes
sequences r, r + N, ... of each, and the loss is divided by the global batch's position counts (known to every
worker from the sequence lengths), so the averaged DDP gradient is the gradient of the global batch whatever N is:
1 and 2 workers follow the same loss curve. Each epoch ends with held-out acceptance per unroll step and a
checkpoint (`ray.train.report`); a rerun with the same storage and name resumes from the latest one
(`ray.train.get_checkpoint`), refusing one made with other settings.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from radar.common.files import write_atomic

STATE_FILE = "state.pt"
PROGRESS_FILE = "train-progress.json"


@dataclass(frozen=True)
class LoopConfig:
    """What each worker trains; `fingerprint()` covers what a resumed checkpoint must agree with."""

    model: str
    train_file: str
    eval_file: str
    vocab: tuple[int, ...]
    layer_ids: tuple[int, ...]
    unroll: int = 4
    epochs: int = 4
    batch_size: int = 16
    micro_batch: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.03  # share of the steps
    bf16: bool = True
    threads: int = 1
    seed: int = 0
    init: str | None = None  # an existing head directory to start from
    stop_after: int | None = None  # end this run after this many epochs in all (a rerun continues)
    progress_dir: str | None = None  # where rank 0 leaves its progress for the driver's bar

    def fingerprint(self) -> dict:
        keep = ("model", "init", "layer_ids", "unroll", "epochs", "batch_size", "lr", "weight_decay", "warmup", "bf16", "seed")
        return {k: v for k, v in asdict(self).items() if k in keep} | {"vocab_hash": hash(self.vocab) & 0xFFFFFFFF}


def build_unroll(cfg: LoopConfig):
    """The head (fresh: lm_head from the target's rows of the draft vocabulary) bound to the target, in its
    training-time-test wrapper."""
    import torch

    from radar.cluster.draft_unroll import Unroll
    from radar.decoding.eagle3 import Eagle3Config, Eagle3Head, draft_vocab_maps
    from radar.decoding.model import Transformer

    target = Transformer.from_pretrained(cfg.model)
    vocab = torch.tensor(cfg.vocab, dtype=torch.long)
    head = Eagle3Head(Eagle3Config.for_target(target.config, len(vocab), cfg.layer_ids), embedding=False)
    d2t, t2d = draft_vocab_maps(vocab, target.config.vocab_size)
    lm_rows = target.lm_head.weight.detach()[vocab].clone()
    with torch.no_grad():
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
        head.lm_head.weight.copy_(lm_rows)
    if cfg.init:
        start = Eagle3Head.from_pretrained(cfg.init)
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in start.state_dict().items()},
                             strict=False)
    head.bind(target)  # keeps only the target's embedding (frozen); its layers are freed with `target`
    return Unroll(head, lm_rows, cfg.unroll)


def step_counts(lengths: list[int], prompt_lens: list[int], index: list[int], steps: int):
    """Scored positions per unroll step over sequences `index`: step k scores positions j >= k with an answer
    token at j + 1 (the same however the sequences are batched)."""
    import torch

    return torch.tensor([sum(max(0, lengths[i] - 2 - max(prompt_lens[i] - 1, k) + 1) for i in index)
                         for k in range(1, steps + 1)], dtype=torch.float32)


def epoch_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Global batches of similar-length sequences (less padding), in a seeded order; the ragged rest is dropped so
    every worker gets an equal share of every batch."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def all_sum(t):
    """Sum a tensor over the workers (no-op for one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def evaluate(model, data, steps: int, rank: int, world: int, micro: int, autocast) -> dict:
    """Held-out cross-entropy and top-1 agreement with the target per unroll step (all workers' shares summed)."""
    import torch

    mine = list(range(rank, len(data), world))
    sums = torch.zeros(3, steps)  # ce, matches, positions
    module = getattr(model, "module", model)
    with torch.no_grad(), autocast():
        for lo in range(0, len(mine), micro):
            batch = data.batch(mine[lo : lo + micro], steps)
            counts = batch.counts(steps).float()
            _, ce, match = module(batch, counts)
            sums += torch.stack((ce.float(), match, counts))
    all_sum(sums)
    ce, match, n = sums
    out = {f"acc_{k + 1}": float(match[k] / n[k].clamp(min=1)) for k in range(steps)}
    out |= {f"eval_ce_{k + 1}": float(ce[k] / n[k].clamp(min=1)) for k in range(steps)}
    return out


def optimizer(cfg: LoopConfig, params: list, per_epoch: int):
    """AdamW with a linear warm-up and a cosine decay over all epochs' steps."""
    import torch

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    return opt, sched


def restore(cfg: LoopConfig, unroll, opt, sched) -> tuple[int, list[dict]]:
    """(epochs done, curve so far) from the run's latest checkpoint, loading its state; (0, []) without one."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=True)
    if state["fingerprint"] != cfg.fingerprint():
        raise ValueError("the checkpoint in the work directory was trained with other settings; use a new --work")
    unroll.head.load_state_dict(state["head"], strict=False)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return state["epoch"], state["curve"]


def train_epoch(model, cfg: LoopConfig, train, epoch: int, opt, sched, autocast):
    """One epoch of optimizer steps; returns (2, steps): cross-entropy sums and scored positions, over all workers."""
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = [train.length(i) for i in range(len(train))]
    batches = epoch_batches(lengths, cfg.batch_size, cfg.seed + epoch)
    sums = torch.zeros(2, cfg.unroll)
    model.train()
    for step, batch_ids in enumerate(batches):
        mine = batch_ids[rank::world]
        totals = step_counts(lengths, train.prompt_lens, batch_ids, cfg.unroll)
        chunks = [mine[i : i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
        for j, chunk in enumerate(chunks):
            sync = j == len(chunks) - 1 or not hasattr(model, "no_sync")  # DDP all-reduces on the last chunk only
            with (nullcontext() if sync else model.no_sync()), autocast():
                loss, ce, _ = model(train.batch(chunk, cfg.unroll).to(device), totals.to(device))
            (loss * world).backward()  # DDP averages over workers; the loss is already the global batch's
            sums[0] += ce.float().cpu()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sums[1] += totals
        if rank == 0 and cfg.progress_dir and step % 5 == 0:
            write_atomic(Path(cfg.progress_dir) / PROGRESS_FILE, json.dumps(
                {"epoch": epoch, "step": step + 1, "steps": len(batches),  # rank 0's share, scaled up to the whole batch
                 "ce_1": float(world * sums[0][0] / sums[1][0].clamp(min=1))}))
    all_sum(sums[0])
    return sums


def train_loop(config: dict) -> None:
    """The per-worker training function (`TorchTrainer(train_loop_per_worker=...)`): epochs from the latest
    checkpoint on, each followed by held-out scores and a checkpoint."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch

    from radar.cluster.draft_data import FeatureSet

    cfg = LoopConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, held = FeatureSet(cfg.train_file), FeatureSet(cfg.eval_file)
    per_epoch = len(epoch_batches([train.length(i) for i in range(len(train))], cfg.batch_size, 0))
    if per_epoch == 0:
        raise ValueError(f"{len(train)} training sequences are fewer than one batch of {cfg.batch_size}")
    unroll = build_unroll(cfg)
    opt, sched = optimizer(cfg, [p for p in unroll.parameters() if p.requires_grad], per_epoch)
    start, curve = restore(cfg, unroll, opt, sched)
    model = ray.train.torch.prepare_model(unroll)
    device = next(unroll.parameters()).device
    unroll.lm_rows = unroll.lm_rows.to(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    for epoch in range(start, cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)):
        t0 = time.perf_counter()
        ce, n = train_epoch(model, cfg, train, epoch, opt, sched, autocast)
        seconds = time.perf_counter() - t0
        model.eval()
        metrics = {"epoch": epoch + 1, "seconds": seconds,
                   "train_seconds": seconds + (curve[-1]["train_seconds"] if curve else 0.0),
                   **{f"train_ce_{k + 1}": float(ce[k] / n[k].clamp(min=1)) for k in range(cfg.unroll)},
                   **evaluate(model, held, cfg.unroll, rank, world, cfg.micro_batch, autocast)}
        curve.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:  # one copy of the state; the others report their metrics only
                head = {k: v for k, v in unroll.head.state_dict().items() if not k.startswith("embed_tokens")}
                torch.save({"head": head, "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch + 1,
                            "curve": curve, "fingerprint": cfg.fingerprint()}, Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)


def fit_head(cfg: LoopConfig, storage: Path, *, workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 1.0,
             name: str = "train-draft", progress: bool = True) -> tuple[dict, list[dict]]:
    """Run (or resume) the training on `workers` Ray Train workers; returns the latest checkpoint's state and the
    per-epoch curve. A run whose checkpoint has all epochs returns it without training again."""
    import torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage.mkdir(parents=True, exist_ok=True)
    cfg = LoopConfig(**{**asdict(cfg), "progress_dir": str(storage)})
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop, train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()), checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    done = threading.Event()
    bar = threading.Thread(target=show_progress, args=(storage / PROGRESS_FILE, cfg.epochs, done, progress), daemon=True)
    bar.start()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps the workers' errors; a user's ValueError should stay one line
        user = user_error(exc)
        if user is not None:
            raise ValueError(user) from None
        raise
    finally:
        done.set()
        bar.join()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {storage} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=True)
    return state, state["curve"]


def user_error(exc: BaseException) -> str | None:
    """The message of a ValueError a worker raised, found inside Ray Train's error (WorkerGroupError)."""
    seen = [exc, *getattr(exc, "worker_failures", {}).values()]
    while seen:
        e = seen.pop(0)
        if isinstance(e, ValueError):
            return str(e).strip().splitlines()[-1].removeprefix("ValueError: ")
        seen += [c for c in (getattr(e, "cause", None), e.__cause__) if isinstance(c, BaseException)]
    return None


def show_progress(path: Path, epochs: int, done: threading.Event, enabled: bool) -> None:
    """A driver-side bar fed by the file rank 0 updates (worker output need not reach the driver)."""
    from tqdm.auto import tqdm

    if not enabled:
        return
    bar, seen = None, None
    while not done.wait(2.0):
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if bar is None:
            bar = tqdm(total=p["steps"] * epochs, unit="step", desc="train head")
        pos = p["epoch"] * p["steps"] + p["step"]
        if pos != seen:
            bar.update(pos - bar.n)
            bar.set_postfix(epoch=p["epoch"] + 1, ce_1=f"{p['ce_1']:.3f}")
            seen = pos
    if bar is not None:
        bar.close()
