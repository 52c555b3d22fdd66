"""llama.cpp beside our engine on the same weights: a fetched model's source GGUF (`model.gguf`) decoded by
llama-cpp-python, plain and with its prompt-lookup speculative mode, and by this engine in float32 and in gguf
precision (the same Q4_1/Q8_0 blocks on PyTorch's int4 kernel), AR and speculative, on exactly the same token ids.

The prompts are `radar bench`'s (the first --limit of mt_bench and of gsm8k), rendered by the model's chat template
with `ModelPair.chat_ids`; llama.cpp is handed those ids, never text. For every thread count and temperature each
engine decodes one warm-up prompt, excluded, then the engines take the prompts in turn, prompt by prompt, so load
drift on a shared machine hits them alike. Tokens/s is new tokens over the summed wall time of the requests,
prompt processing included as in `radar bench`, model loading excluded. T=1 samples the plain distribution
(top_k=0, top_p=1, min_p=0, typical_p=1, no repeat penalty). Each T=0 row counts the prompts whose output equals
our gguf `ar` (speculation must equal it everywhere) and our float32 `ar` (how close the quantized model is).

Usage: python benchmarks/llama_cpp_bench.py [--model DIR] [--limit N] [--max-new-tokens N] [--threads 1 2]
       [--temperatures 0 1] [--methods chain:1 radar] [--extra-buffers] [--out FILE]   (pip install -e ".[llamacpp]")
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
from radar.ops.models import BUNDLED_HEAD, attach_controller

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


def decoder(engine: str, llm, pairs: dict[str, ModelPair], eos: set[int], temperature: float):
    """`decode(ids, max_new_tokens, seed)` -> new token ids, for one engine at one temperature."""
    if engine.startswith("radar "):  # "radar <precision> <method>"
        _, precision, method = engine.split()
        sampling = Sampling(temperature, 1.0)
        return lambda ids, n, seed: pairs[precision].generate(ids, method, sampling, n, seed).token_ids
    return lambda ids, n, seed: llama_decode(llm, ids, eos, n, temperature, seed)


def run(decoders: dict, prompt_ids: list[list[int]], max_new_tokens: int, seed: int) -> dict[str, dict]:
    """Each engine decodes a warm-up prompt, then the engines take every prompt in turn; per engine tokens/s, new
    tokens, wall time and the outputs."""
    for decode in decoders.values():
        decode(prompt_ids[0], WARMUP_TOKENS, seed)
    outputs, wall = {e: [] for e in decoders}, dict.fromkeys(decoders, 0.0)
    for i, ids in enumerate(prompt_ids):
        for engine, decode in decoders.items():
            t0 = time.perf_counter()
            outputs[engine].append(decode(ids, max_new_tokens, seed + i))
            wall[engine] += time.perf_counter() - t0
    return {e: {"tokens_per_s": sum(map(len, outputs[e])) / wall[e], "new_tokens": sum(map(len, outputs[e])),
                "wall_s": wall[e], "outputs": outputs[e]} for e in decoders}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=model_dir("smollm2-135m-instruct"),
                    help="a checkpoint from `radar models fetch` (it keeps model.gguf)")
    ap.add_argument("--limit", type=int, default=20, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["chain:1", "chain:2", "tree:2", "radar"],
                    help="our speculative methods on the gguf target, beside its ar and float32 ar")
    ap.add_argument("--head", type=Path, default=BUNDLED_HEAD, help="the EAGLE-3 head the methods draft with")
    ap.add_argument("--extra-buffers", action="store_true",
                    help="let llama.cpp use its AMX and repacked weight buffers (where the CPU grants AMX)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llama-cpp-smollm2.json"))
    args = ap.parse_args()

    gguf = gguf_path(args.model)
    pairs = {p: attach_controller(ModelPair.load(args.model, args.head, device="cpu", dtype=p))
             for p in ("float32", "gguf")}
    prompts = [p for name in PROMPT_SETS for p in load_prompts(name, args.limit)]
    prompt_ids = [pairs["gguf"].chat_ids(p.text) for p in prompts]
    eos = set(pairs["gguf"].target.config.eos_token_id)
    n_ctx = max(map(len, prompt_ids)) + args.max_new_tokens + PLD_TOKENS + 1
    engines = ["llama.cpp", "llama.cpp-pld", "radar float32 ar", "radar gguf ar",
               *(f"radar gguf {m}" for m in args.methods)]

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        llms = {e: load_llama(gguf, e, threads, n_ctx, args.extra_buffers) for e in engines if e.startswith("llama")}
        for temperature in args.temperatures:
            decoders = {e: decoder(e, llms.get(e), pairs, eos, temperature) for e in engines}
            for engine, result in run(decoders, prompt_ids, args.max_new_tokens, args.seed).items():
                rows.append({"engine": engine, "threads": threads, "temperature": temperature, **result})
                print(f"{engine}, {threads} thread(s), T={temperature:g}: {result['tokens_per_s']:.1f} tokens/s",
                      flush=True)
        del llms

    for r in rows:  # T=0 outputs against our two ARs at the same thread count
        for key, engine in (("equal_to_gguf_ar", "radar gguf ar"), ("equal_to_float32_ar", "radar float32 ar")):
            ref = next((x["outputs"] for x in rows if x["engine"] == engine and x["threads"] == r["threads"]
                        and x["temperature"] == 0), None)
            r[key] = sum(map(list.__eq__, r["outputs"], ref)) if r["temperature"] == 0 and ref else None
    result = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "gguf": str(gguf),
                   "prompt_sets": PROMPT_SETS, "prompt_count": len(prompts), "pld_tokens": PLD_TOKENS,
                   "llama_cpp_python": version("llama-cpp-python"), "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    table = Table("engine", "threads", "T", "tokens/s", "new tokens", "= gguf ar", "= float32 ar",
                  title=f"{gguf.parent.name}: {len(prompts)} prompts ({', '.join(PROMPT_SETS)}), "
                        f"{args.max_new_tokens} new tokens at most")
    for r in rows:
        match = ["-" if r[k] is None else f"{r[k]}/{len(prompts)}" for k in ("equal_to_gguf_ar", "equal_to_float32_ar")]
        table.add_row(r["engine"], str(r["threads"]), f"{r['temperature']:g}", f"{r['tokens_per_s']:.1f}",
                      str(r["new_tokens"]), *match)
    Console(width=140).print(table)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
