"""Options several commands share, each written once (the commands' own options stay beside them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[Optional[Path], typer.Option(help="Target checkpoint directory (HF format). Default: SmolLM2-135M-Instruct (fetched once).")]
Draft = Annotated[Optional[Path], typer.Option(help="Draft checkpoint directory sharing the target's tokenizer. "
                                                    "Default: the EAGLE-3 head bundled for SmolLM2-135M-Instruct.")]
Device = Annotated[str, typer.Option(help="auto (CUDA if present, else CPU), cpu or cuda[:N]")]
Dtype = Annotated[str, typer.Option(
    "--precision", "--dtype",
    help="The target's precision: auto, gguf (its GGUF blocks on the int4 kernel, CPU), float32, bfloat16 or float16. "
         "auto: gguf on a CPU with native bf16 when the checkpoint keeps its GGUF, else bfloat16 there and on a GPU, "
         "else float32.")]
Controller = Annotated[Optional[str], typer.Option(
    help="Controller for method radar: a directory from radar train, a reference .pt file or "
         "models:/radar-controller@champion. Default: the controllers bundled for the default pair.")]
TreeTokens = Annotated[Optional[int], typer.Option(
    help="Tree nodes verified per cycle (default 60 on GPU, 12 on CPU, 3 on CPU in gguf precision).")]
MaxCalls = Annotated[Optional[int], typer.Option(
    help="Draft calls per cycle at most for radar and threshold:P (default 8; 3 on CPU in gguf precision).")]
Prompts = Annotated[str, typer.Option(help="A jsonl file, or a bundled set: mt_bench, gsm8k, alpaca, mbpp; join sets with +.")]
Costs = Annotated[str, typer.Option(help="Cost file from radar profile, or a preset name.")]
Temperature = Annotated[float, typer.Option(help="0 for greedy.")]
MaxNewTokens = Annotated[int, typer.Option(help="New tokens per prompt at most.")]
Track = Annotated[bool, typer.Option(help="Log the run to MLflow.")]
EvalFraction = Annotated[float, typer.Option(help="Share of prompts held out for the simulated speedup.")]


def path_or_none(p: Path | None) -> str | None:
    """A CLI path option as the string the configs store."""
    return str(p) if p is not None else None
