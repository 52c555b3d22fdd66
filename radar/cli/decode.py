"""`radar generate` and `radar bench`: decoding one prompt, and methods side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from radar.cli import options as opt
from radar.cli.errors import UserError, say, user_errors

# The fastest greedy method measured on the default pair, by precision (benchmarks/README.md); float32 loses with
# every tree on a CPU, and the rest (bf16, float16 on a GPU) gain with tree:3. In gguf radar is fastest with the
# controllers bundled for that pair; for another pair, the best fixed rule there.
FASTEST_METHOD = {"gguf": "radar", "float32": "ar"}
FASTEST_FIXED = {"gguf": "chain:1"}


def default_method(precision: str, has_draft: bool, default_pair: bool) -> str:
    """The method `radar generate` runs when none is named (see FASTEST_METHOD)."""
    if not has_draft:
        return "ar"
    method = FASTEST_METHOD.get(precision, "tree:3")
    return FASTEST_FIXED.get(precision, method) if method == "radar" and not default_pair else method


def resolve_models(model: Path | None, draft: Path | None) -> tuple[Path, Path | None]:
    """The checkpoints to load; the default pair (said so on stderr) when no --model is given."""
    from radar.ops.models import model_paths

    note_default_pair(model, draft)
    return model_paths(model, draft)


def note_default_pair(model: Path | None, draft: Path | None) -> None:
    """Say on stderr that the default pair is used when no checkpoint is named."""
    if model is None and draft is None:
        say("No --model given: using SmolLM2-135M-Instruct with its bundled EAGLE-3 head.")


def note_bundled_controller(model: Path | None, controller: str | None, methods: list[str]) -> None:
    """Say on stderr when method radar runs another pair with the controllers trained for the default one."""
    if model is not None and controller is None and "radar" in methods:
        say("No --controller given: radar uses the controllers bundled for SmolLM2-135M-Instruct (trained on that "
            "pair's records; train your own with radar collect + radar train).")


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    model: opt.Model = None,
    draft: opt.Draft = None,
    method: Optional[str] = typer.Option(
        None, help="ar, radar, chain:D, tree:D (D = draft calls per cycle) or threshold:P. Default: the fastest greedy method "
                   "measured on the default pair in the precision in use: radar in gguf (chain:1 for another pair), ar in "
                   "float32, tree:3 in bf16 (benchmarks/README.md); ar without a draft."),
    controller: opt.Controller = None,
    temperature: opt.Temperature = 0.0,
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(128, help="New tokens at most."),
    seed: int = typer.Option(0, help="Sampling seed."),
    tree_tokens: opt.TreeTokens = None,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as it is (already templated text) instead of as "
                                                  "a user turn of the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Generate text for one prompt (a user turn of the chat template, or --raw text) with the target alone (ar)
    or speculatively."""
    from radar.decoding.methods import Method
    from radar.decoding.pair import precision_of
    from radar.decoding.verify import Sampling
    from radar.ops.models import attach_controller, load_pair

    with user_errors():
        parsed, sampling = Method.parse(method) if method else None, Sampling(temperature, top_p)
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if not prompt.strip():
            raise UserError("the prompt is empty")
        default_pair = model is None and draft is None
        model, draft = resolve_models(model, draft)
        if parsed is not None and parsed.speculative and draft is None:
            raise UserError(f"--method {method} needs --draft PATH (or use --method ar)")
        pair = load_pair(model, draft, device, dtype, tree_tokens=tree_tokens)
        if parsed is None:
            parsed = Method.parse(default_method(precision_of(pair.target), draft is not None, default_pair))
        if parsed.kind == "radar":
            attach_controller(pair, controller)
        ids = pair.encode(prompt) if raw else pair.chat_ids(prompt)
        result = pair.generate(ids, parsed, sampling, max_new_tokens, seed)
    text = pair.decode(result.token_ids)
    if as_json:
        out = {"text": text, "token_ids": result.token_ids, "method": str(parsed), **result.stats.summary()}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    sys.stdout.write(text + "\n")
    s = result.stats
    if parsed.kind == "radar" and not s.draft_calls_per_cycle:
        if pair.gate is not None and pair.gate.gates(sampling.temperature == 0):
            say("[dim]radar did not draft: its controller's simulated margin over the target alone is within the "
                "simulator's error, so a process measures both and first runs the target alone (a server keeps "
                "whichever is faster)[/]")
        else:
            say("[dim]radar did not draft: its controller for this temperature was trained where the target alone "
                "is faster (\"drafts\": false in its controller.json)[/]")
    say(f"[dim]{s.new_tokens} tokens in {s.wall_s:.2f}s ({s.tokens_per_s:.1f} tok/s), tau {s.tau:.2f}, "
        f"{s.mean_draft_calls:.2f} draft calls/cycle, {s.target_calls} target calls, finish: {s.finish_reason}[/]")


def print_bench(result: dict, title: str) -> None:
    """The benchmark table and whether greedy outputs match ar."""
    from radar.ops.tables import bench_table, greedy_match_line

    console = Console()
    console.print(bench_table(result, title))
    line = greedy_match_line(result)
    if line:
        console.print(line)


def bench(
    prompts: opt.Prompts = "mt_bench",
    limit: Optional[int] = typer.Option(20, help="Use the first N prompts (of each set, for sets joined with +)."),
    max_new_tokens: opt.MaxNewTokens = 128,
    temperature: opt.Temperature = 0.0,
    top_p: float = typer.Option(1.0),
    methods: str = typer.Option("ar,hf,hf-pld,chain:3,tree:3,radar",
                                help="Comma-separated: ar, hf, hf-pld, hf-assisted (a small-LM draft only), radar, "
                                     "chain:D, tree:D, threshold:P, tree:D@B, threshold:P@B (B tree tokens)."),
    controller: opt.Controller = None,
    repeats: int = typer.Option(1, help="Timed repeats per method; the median is kept."),
    seed: int = typer.Option(0),
    model: opt.Model = None,
    draft: opt.Draft = None,
    tree_tokens: opt.TreeTokens = None,
    max_calls: opt.MaxCalls = None,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    out: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
    track: opt.Track = True,
) -> None:
    """Benchmark decoding methods side by side on the same prompts, in one run."""
    from rich.progress import Progress

    from radar.common import tracking
    from radar.ops.bench import BenchConfig, benchmark, log_benchmark, progress_steps

    with user_errors():
        cfg = BenchConfig(
            prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            methods=[m.strip() for m in methods.split(",") if m.strip()], repeats=repeats, seed=seed,
            model=opt.path_or_none(model), draft=opt.path_or_none(draft), device=device, dtype=dtype,
            tree_tokens=tree_tokens, max_calls=max_calls, controller=controller,
        )
        note_default_pair(model, draft)
        note_bundled_controller(model, controller, cfg.methods)
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"benchmarking {cfg.prompts}", total=progress_steps(cfg))
            result = benchmark(cfg, out, on_step=lambda m: progress.advance(task))
    print_bench(result, f"{cfg.prompts}, {len(cfg.methods)} methods, T={temperature}")
    if out:
        say(f"results written to {out}")
    if track:
        with user_errors():
            log_benchmark(cfg, result)
        say(f"logged to MLflow at {tracking.tracking_uri()} (experiment {tracking.BENCH_EXPERIMENT})")
