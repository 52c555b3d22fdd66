"""The `radar train-draft` command: an EAGLE-3 draft head trained for a target on its own answers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from radar.cli.errors import say, user_errors


def train_draft(
    model: Path = typer.Option(..., help="Target checkpoint directory (HF format)."),
    out: Path = typer.Option(..., help="Where the head goes (config.json + model.safetensors, the EAGLE-3 layout)."),
    prompts: str = typer.Option("mt_bench", help="Comma-separated prompt sets (bundled names or jsonl files) used "
                                "as given; generated prompts are added. GSM8K, MBPP and Alpaca prompts are never used."),
    generated: int = typer.Option(1000, help="Template prompts to add (arithmetic, coding, instructions, pydoc)."),
    topic_questions: int = typer.Option(200, help="Topic requests the target turns into questions of its own."),
    eval_limit: int = typer.Option(8, help="Held-out prompts per set (the last of GSM8K, MBPP, Alpaca) scored each epoch."),
    max_new_tokens: int = typer.Option(192, help="Answer tokens per prompt at most."),
    temperature: float = typer.Option(0.0, help="The target's answers: 0 greedy, else sampled at this temperature."),
    draft_vocab: int = typer.Option(8192, help="Draft vocabulary size (capped to the target's vocabulary)."),
    unroll: int = typer.Option(4, help="Training-time-test steps."),
    epochs: int = typer.Option(4),
    batch_size: int = typer.Option(16, help="Sequences per optimizer step over all workers."),
    lr: float = typer.Option(1e-3),
    workers: int = typer.Option(2, help="Ray actors answering the prompts."),
    train_workers: int = typer.Option(1, help="Ray Train workers (DDP; one GPU each with --gpu)."),
    gpu: bool = typer.Option(False, help="Train on GPUs when the Ray cluster has them."),
    threads: int = typer.Option(1, help="Torch threads per training worker."),
    bf16: bool = typer.Option(True, help="bfloat16 answers, features and autocast."),
    init: Optional[Path] = typer.Option(None, help="An existing head to continue training from."),
    work: Optional[Path] = typer.Option(None, help="Work directory (answers, features, checkpoints; a rerun "
                                        "resumes it). Default: OUT-work."),
    seed: int = typer.Option(0),
    track: bool = typer.Option(True, help="Log to MLflow and register the head as radar-eagle3-head@champion."),
) -> None:
    """Train an EAGLE-3 draft head for a target: the target answers the prompts itself (Ray actors), the head
    learns with training-time test on Ray Train, and is saved, logged and registered."""
    from radar.ops.train_draft import TrainDraftConfig
    from radar.ops.train_draft import train_draft as run

    with user_errors():
        cfg = TrainDraftConfig(
            model=str(model), out=str(out), prompts=tuple(p for p in prompts.split(",") if p), generated=generated,
            topic_questions=topic_questions, eval_limit=eval_limit, max_new_tokens=max_new_tokens,
            temperature=temperature, draft_vocab=draft_vocab, unroll=unroll, epochs=epochs, batch_size=batch_size,
            lr=lr, answer_workers=workers, train_workers=train_workers, use_gpu=gpu, threads=threads, bf16=bf16,
            init=str(init) if init else None, work=str(work) if work else None, seed=seed, track=track,
            register=track)
        result = run(cfg, log=say)
    last = result.curve[-1]
    accs = " ".join(f"{last[f'acc_{k}']:.2f}" for k in range(1, unroll + 1))
    Console().print(f"{result.data['sequences']} sequences, {result.data['answer_tokens']} answer tokens; held-out "
                    f"top-1 per step {accs} -> {out}")
