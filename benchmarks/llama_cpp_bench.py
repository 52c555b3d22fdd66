"""llama.cpp beside our engine on the same weights: a fetched model's source GGUF (`model.gguf`) decoded by
llama-cpp-python, plain and with its prompt-lookup speculative mode, on exactly the token ids `radar bench` decodes.

The prompts are `radar bench`'s (the first --limit of mt_bench and of gsm8k), rendered by the model's chat template
with `ModelPair.chat_ids`; llama.cpp is handed those ids, never text. Every configuration (engine, threads,
temperature) decodes one warm-up prompt first, excluded, then every prompt once; tokens/s is new tokens over the
summed wall time of the requests, prompt processing included as in `radar bench`, model loading excluded. T=1
samples the plain distribution (top_k=0, top_p=1, min_p=0, typical_p=1, no repeat penalty). With --compare-ar our
engine's `ar` (float32, CPU) runs in the same loops, and each T=0 row counts the prompts whose output equals ours.

Usage: python benchmarks/llama_cpp_bench.py [--model DIR] [--limit N] [--max-new-tokens N] [--threads 1 2]
       [--temperatures 0 1] [--compare-ar] [--extra-buffers] [--out FILE]    (pip install -e ".[llamacpp]")
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from radar.common.prompts import load_prompts
from radar.decoding.pair import ModelPair
from radar.decoding.verify import Sampling
from radar.ops.fetch import gguf_path, model_dir

PROMPT_SETS = ("mt_bench", "gsm8k")
PLD_TOKENS = 10  # candidates per lookup, as transformers' hf-pld
WARMUP_TOKENS = 8


def load_llama(gguf: Path, engine: str, threads: int, n_ctx: int, extra_buffers: bool):
    """A llama.cpp model on `threads` threads; `llama.cpp-pld` drafts by prompt lookup, verified by the model."""
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    # llama.cpp's extra weight buffers (AMX, repacking) die of an illegal instruction on VMs that report AMX but do
    # not grant it; Llama() takes no option for them, so the default model parameters are edited while it loads.
    defaults = capi.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_buffers
        return p

    draft = LlamaPromptLookupDecoding(num_pred_tokens=PLD_TOKENS) if engine == "llama.cpp-pld" else None
    capi.llama_model_default_params = params
    try:
        return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                     draft_model=draft, verbose=False)
    finally:
        capi.llama_model_default_params = defaults


def llama_decode(llm, ids: list[int], eos: set[int], max_new_tokens: int, temperature: float, seed: int) -> list[int]:
    """New token ids, EOS included as our engine keeps it."""
    llm.reset()  # no prefix reuse across prompts: every request processes its whole prompt, as ours does
    llm.set_seed(seed)
    out = []
    for token in llm.generate(ids, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                              repeat_penalty=1.0):
        out.append(token)
        if token in eos or len(out) == max_new_tokens:  # generate itself never stops
            break
    return out


def decoder(engine: str, llm, pair: ModelPair, eos: set[int], temperature: float):
    """`decode(ids, max_new_tokens, seed)` -> new token ids, for one engine at one temperature."""
    if engine == "radar ar":
        sampling = Sampling(temperature, 1.0)
        return lambda ids, n, seed: pair.generate(ids, "ar", sampling, n, seed).token_ids
    return lambda ids, n, seed: llama_decode(llm, ids, eos, n, temperature, seed)


def run(decode, prompt_ids: list[list[int]], max_new_tokens: int, seed: int) -> dict:
    """Decode every prompt once after an excluded warm-up; tokens/s, new tokens, wall time and the outputs."""
    decode(prompt_ids[0], WARMUP_TOKENS, seed)
    outputs, wall = [], 0.0
    for i, ids in enumerate(prompt_ids):
        t0 = time.perf_counter()
        outputs.append(decode(ids, max_new_tokens, seed + i))
        wall += time.perf_counter() - t0
    new_tokens = sum(map(len, outputs))
    return {"tokens_per_s": new_tokens / wall, "new_tokens": new_tokens, "wall_s": wall, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=model_dir("smollm2-135m-instruct"),
                    help="a checkpoint from `radar models fetch` (it keeps model.gguf)")
    ap.add_argument("--limit", type=int, default=20, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-ar", action="store_true", help="also run our ar (float32) and compare T=0 outputs")
    ap.add_argument("--extra-buffers", action="store_true",
                    help="let llama.cpp use its AMX and repacked weight buffers (where the CPU grants AMX)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llama-cpp-smollm2.json"))
    args = ap.parse_args()

    gguf = gguf_path(args.model)
    pair = ModelPair.load(args.model, device="cpu", dtype="float32")
    prompts = [p for name in PROMPT_SETS for p in load_prompts(name, args.limit)]
    prompt_ids = [pair.chat_ids(p.text) for p in prompts]
    eos = set(pair.target.config.eos_token_id)
    n_ctx = max(map(len, prompt_ids)) + args.max_new_tokens + PLD_TOKENS + 1
    engines = ["llama.cpp", "llama.cpp-pld"] + (["radar ar"] if args.compare_ar else [])

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for engine in engines:
            llm = None if engine == "radar ar" else load_llama(gguf, engine, threads, n_ctx, args.extra_buffers)
            for temperature in args.temperatures:
                result = run(decoder(engine, llm, pair, eos, temperature), prompt_ids, args.max_new_tokens, args.seed)
                rows.append({"engine": engine, "threads": threads, "temperature": temperature, **result})
                print(f"{engine}, {threads} thread(s), T={temperature:g}: {result['tokens_per_s']:.1f} tokens/s",
                      flush=True)
            del llm

    ours = next((r["outputs"] for r in rows if r["engine"] == "radar ar" and r["temperature"] == 0), None)
    for r in rows:
        r["equal_to_ar"] = (sum(a == b for a, b in zip(r["outputs"], ours))
                            if ours is not None and r["temperature"] == 0 else None)
    result = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "gguf": str(gguf),
                   "prompt_sets": PROMPT_SETS, "prompt_count": len(prompts), "pld_tokens": PLD_TOKENS,
                   "llama_cpp_python": version("llama-cpp-python"), "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    table = Table("engine", "threads", "T", "tokens/s", "new tokens", "T=0 outputs = our ar",
                  title=f"{gguf.parent.name}: {len(prompts)} prompts ({', '.join(PROMPT_SETS)}), "
                        f"{args.max_new_tokens} new tokens at most")
    for r in rows:
        match = "-" if r["equal_to_ar"] is None else f"{r['equal_to_ar']}/{len(prompts)}"
        table.add_row(r["engine"], str(r["threads"]), f"{r['temperature']:g}", f"{r['tokens_per_s']:.1f}",
                      str(r["new_tokens"]), match)
    Console().print(table)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
