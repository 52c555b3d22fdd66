"""Engine benchmark: our AR decoding against transformers' generate, and the price of tree verification.

On a random-init Llama of about 10M parameters (same weights for both engines):
  1. greedy tokens/s of `generate_ar` against `LlamaForCausalLM.generate`, as a ratio, outputs checked equal;
  2. the time of one verification forward over q = 16, 32, 64 tree tokens on a 200-token cache, relative to q = 1.
Usage: python benchmarks/bench_engine.py [--device cpu|cuda] [--dtype float32|bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from radar.decoding.generate import generate_ar
from radar.decoding.model import Transformer
from radar.decoding.pair import DTYPES

HF_CONFIG = dict(
    vocab_size=4096,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_tree_mask(q: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestors-or-self mask of a random tree with q nodes (each node's parent is an earlier node or the root)."""
    mask = torch.eye(q, dtype=torch.bool)
    for i in range(1, q):
        parent = int(torch.randint(-1, i, (1,), generator=gen))
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        hf = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).eval()
        hf.save_pretrained(tmp)
        ours = Transformer.from_pretrained(tmp, device=device, dtype=dtype)
    hf = hf.to(device=device, dtype=dtype)
    params = sum(p.numel() for p in ours.parameters())
    prompt = torch.randint(0, HF_CONFIG["vocab_size"], (32,)).tolist()
    n = args.new_tokens

    ours_out = generate_ar(ours, prompt, max_new_tokens=n).token_ids
    hf_out = hf.generate(
        torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
    )[0, len(prompt) :].tolist()
    t_ours = timed(lambda: generate_ar(ours, prompt, max_new_tokens=n), device, args.repeats)
    t_hf = timed(
        lambda: hf.generate(
            torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
        ),
        device,
        args.repeats,
    )

    # Verification cost: q tree tokens on top of a 200-token cache, against one token.
    gen = torch.Generator().manual_seed(0)
    cache = ours.new_cache(200 + 64)
    ours(torch.randint(0, 4096, (1, 200), device=device), cache=cache)
    verify_ms = {}
    for q in (1, 8, 16, 32, 64):
        tokens = torch.randint(0, 4096, (1, q), device=device)
        mask = random_tree_mask(q, gen).to(device)
        depth = mask.sum(1)  # a node's depth = number of its ancestors-or-self
        positions = (199 + depth)[None].to(device)

        def step():
            cache.length = 200
            ours(tokens, positions, cache, mask if q > 1 else None)

        verify_ms[q] = 1000 * timed(step, device, 30)

    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "device": str(device),
        "dtype": args.dtype,
        "model": {**HF_CONFIG, "parameters": params},
        "ar": {
            "new_tokens": n,
            "ours_tokens_per_s": n / t_ours,
            "hf_tokens_per_s": n / t_hf,
            "speedup_vs_hf": t_hf / t_ours,
            "outputs_equal": ours_out == hf_out,
        },
        "verify_forward_ms": verify_ms,
        "verify_cost_vs_q1": {q: verify_ms[q] / verify_ms[1] for q in verify_ms},
    }
    print(f"model: {params / 1e6:.1f}M parameters, {device} {args.dtype}")
    print(f"AR greedy, {n} tokens: ours {n / t_ours:.1f} tok/s, transformers {n / t_hf:.1f} tok/s, "
          f"ratio {t_hf / t_ours:.2f}x, outputs equal: {ours_out == hf_out}")
    for q, ms in verify_ms.items():
        print(f"verify q={q:>2}: {ms:6.2f} ms  ({ms / verify_ms[1]:.2f}x of q=1)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
