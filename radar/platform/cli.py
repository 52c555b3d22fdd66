"""The `radar` command line."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lossless speculative decoding with a learned draft controller.")
err = Console(stderr=True)

DEVICE_HELP = "auto (CUDA if present, else CPU), cpu or cuda[:N]"
DTYPE_HELP = "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16"


class UserError(Exception):
    """A mistake the user can fix; reported as one line, never as a traceback."""


@contextmanager
def user_errors():
    """Turn the errors a user can cause into a one-line message and exit code 2."""
    from radar.decoding.model import ModelLoadError

    try:
        yield
    except (UserError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _model_paths(model: Optional[Path], draft: Optional[Path]) -> tuple[Path, Optional[Path]]:
    if model is None:
        from radar.platform.demo_models import ensure_demo_pair

        if draft is not None:
            raise UserError("--draft given without --model: name the target too")
        err.print("No --model given: using the demo pair (built on first use).")
        return ensure_demo_pair()
    return model, draft


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory (HF format). Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory sharing the target's tokenizer."),
    method: str = typer.Option("tree:4", help="ar, chain:D or tree:D (D = draft calls per cycle)."),
    temperature: float = typer.Option(0.0, help="0 for greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(128, help="New tokens at most."),
    seed: int = typer.Option(0, help="Sampling seed."),
    tree_tokens: Optional[int] = typer.Option(None, help="Tree nodes verified per cycle (default 60 on GPU, 16 on CPU)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Generate text for one prompt with the target alone (ar) or speculatively."""
    from dataclasses import replace

    from radar.decoding.generate import Method
    from radar.decoding.pair import ModelPair
    from radar.decoding.verify import Sampling

    with user_errors():
        parsed = Method.parse(method)
        sampling = Sampling(temperature, top_p)
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if not prompt.strip():
            raise UserError("the prompt is empty")
        model, draft = _model_paths(model, draft)
        if parsed.kind != "ar" and draft is None:
            raise UserError(f"--method {method} needs --draft PATH (or use --method ar)")
        pair = ModelPair.load(model, draft, device=device, dtype=dtype)
        if tree_tokens is not None:
            pair.tree = replace(pair.tree, total_tokens=tree_tokens)
        ids = pair.encode(prompt)
        result = pair.generate(ids, parsed, sampling, max_new_tokens, seed)
    text = pair.decode(result.token_ids)
    if as_json:
        out = {"text": text, "token_ids": result.token_ids, "method": str(parsed), **result.stats.summary()}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    sys.stdout.write(text + "\n")
    s = result.stats
    err.print(
        f"[dim]{s.new_tokens} tokens in {s.wall_s:.2f}s ({s.tokens_per_s:.1f} tok/s), tau {s.tau:.2f}, "
        f"{s.mean_draft_calls:.2f} draft calls/cycle, {s.target_calls} target calls, finish: {s.finish_reason}[/]"
    )


def _print_bench_table(result: dict, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "tokens/s", "speedup vs ar", "tau", "draft calls/cycle", "wall s", "new tokens"):
        table.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, r in result["methods"].items():
        table.add_row(name, fmt(r["tokens_per_s"], ".1f"), fmt(r["speedup_vs_ar"], ".2f") + "x", fmt(r["tau"], ".2f"),
                      fmt(r["draft_calls_per_cycle"], ".2f"), fmt(r["wall_s"], ".2f"), str(r["new_tokens"]))
    Console().print(table)
    match = result.get("greedy_outputs_match_ar")
    if match is not None:
        bad = [m for m, ok in match.items() if not ok]
        Console().print("greedy outputs identical to ar: " + ("all methods" if not bad else f"NO for {', '.join(bad)}"))


def run_benchmark(cfg, out: Optional[Path], track: bool, title: str) -> dict:
    """Load the pair, run the benchmark with a progress bar, print the table, write JSON, log to MLflow."""
    from dataclasses import asdict, replace

    from rich.progress import Progress

    from radar.decoding.pair import ModelPair
    from radar.platform.bench import HF_METHODS, HFRunner, run_bench
    from radar.platform.prompts import load_prompts

    prompts = load_prompts(cfg.prompts, cfg.limit)
    model, draft = _model_paths(Path(cfg.model) if cfg.model else None, Path(cfg.draft) if cfg.draft else None)
    cfg.model, cfg.draft = str(model), str(draft) if draft else None
    pair = ModelPair.load(model, draft, device=cfg.device, dtype=cfg.dtype)
    if cfg.tree_tokens is not None:
        pair.tree = replace(pair.tree, total_tokens=cfg.tree_tokens)
    hf = HFRunner(cfg.model, cfg.draft, pair.target.device, pair.target.dtype) if set(cfg.methods) & set(HF_METHODS) else None
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"benchmarking {len(prompts)} prompts", total=cfg.repeats * len(cfg.methods))
        result = run_bench(pair, prompts, cfg, hf, on_step=lambda m: progress.advance(task))
    _print_bench_table(result, title)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        err.print(f"results written to {out}")
    if track:
        from radar.platform import tracking

        with tracking.run("radar-bench", params=asdict(cfg)):
            tracking.log_metrics({m: {k: v for k, v in r.items() if k != "outputs"} for m, r in result["methods"].items()})
            tracking.log_json(result, "bench.json")
        err.print(f"logged to MLflow at {tracking.tracking_uri()} (experiment radar-bench)")
    return result


@app.command()
def bench(
    prompts: str = typer.Option("mt_bench", help="A jsonl file, or a bundled set: mt_bench, gsm8k, alpaca, mbpp."),
    limit: Optional[int] = typer.Option(20, help="Use the first N prompts."),
    max_new_tokens: int = typer.Option(128, help="New tokens per prompt at most."),
    temperature: float = typer.Option(0.0, help="0 for greedy."),
    top_p: float = typer.Option(1.0),
    methods: str = typer.Option("ar,hf,hf-assisted,chain:4,tree:4", help="Comma-separated: ar, hf, hf-assisted, chain:D, tree:D."),
    repeats: int = typer.Option(3, help="Timed repeats per method; the median is kept."),
    seed: int = typer.Option(0),
    model: Optional[Path] = typer.Option(None, help="Target checkpoint directory. Default: the demo target."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint directory. Default: the demo draft."),
    tree_tokens: Optional[int] = typer.Option(None, help="Tree nodes verified per cycle (default 60 on GPU, 16 on CPU)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    out: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
    track: bool = typer.Option(True, help="Log the run to MLflow."),
) -> None:
    """Benchmark decoding methods side by side on the same prompts, in one run."""
    from radar.platform.bench import BenchConfig

    with user_errors():
        cfg = BenchConfig(
            prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            methods=[m.strip() for m in methods.split(",") if m.strip()], repeats=repeats, seed=seed,
            model=str(model) if model else None, draft=str(draft) if draft else None, device=device, dtype=dtype,
            tree_tokens=tree_tokens,
        )
        run_benchmark(cfg, out, track, title=f"{cfg.prompts}, {len(cfg.methods)} methods, T={temperature}")


def main() -> None:  # pragma: no cover - console entry
    app()
