"""How close the gguf precision (the GGUF's own Q4_1/Q8_0 blocks on PyTorch's int4 kernel, bf16 activations) is
to the float32 model dequantized from the same file, and what each step of the way costs.

For each of `radar bench`'s prompts (the first --limit of mt_bench and of gsm8k, chat-templated) the float32 model
decodes --max-new-tokens greedily; both models then read prompt + answer in one forward, and at every answer
position the script compares their logits: the largest absolute error, the RMS error over the RMS of the float32
logits, and whether the top token agrees. A dense bf16 model (the float32 weights rounded to bf16, bf16
activations) is measured the same way, as the yardstick of computing in bf16 at all. Whole-answer greedy
agreement is in llama_cpp_bench.py's table (`= float32 ar`).

Usage: python benchmarks/gguf_accuracy.py [--model DIR] [--limit N] [--max-new-tokens N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from radar.common.prompts import load_prompts
from radar.decoding.pair import ModelPair
from radar.ops.fetch import model_dir

PROMPT_SETS = ("mt_bench", "gsm8k")


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Errors of `other` against `reference` logits (positions, vocab)."""
    err = (other - reference).abs()
    return {"max_abs_error": float(err.max()), "rms_error_over_rms": float(err.pow(2).mean().sqrt()
                                                                             / reference.pow(2).mean().sqrt()),
            "top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=model_dir("smollm2-135m-instruct"))
    ap.add_argument("--limit", type=int, default=20, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf-accuracy-smollm2.json"))
    args = ap.parse_args()

    pairs = {p: ModelPair.load(args.model, device="cpu", dtype=p) for p in ("float32", "bfloat16", "gguf")}
    prompts = [p for name in PROMPT_SETS for p in load_prompts(name, args.limit)]
    logits: dict[str, list[torch.Tensor]] = {p: [] for p in pairs}
    for prompt in prompts:
        ids = pairs["float32"].chat_ids(prompt.text)
        answer = pairs["float32"].generate(ids, "ar", max_new_tokens=args.max_new_tokens).token_ids
        full = torch.tensor([ids + answer])
        for name, pair in pairs.items():
            with torch.no_grad():  # the positions that predict the answer's tokens
                logits[name].append(pair.target(full)[0, len(ids) - 1: -1].float())
    joined = {name: torch.cat(rows) for name, rows in logits.items()}
    result = {
        "config": {"model": str(args.model), "prompt_sets": PROMPT_SETS, "prompt_count": len(prompts),
                   "max_new_tokens": args.max_new_tokens, "positions": joined["float32"].shape[0],
                   "torch": torch.__version__},
        "against_float32": {name: compare(joined["float32"], joined[name]) for name in ("bfloat16", "gguf")},
        "float32_logit_rms": float(joined["float32"].pow(2).mean().sqrt()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
