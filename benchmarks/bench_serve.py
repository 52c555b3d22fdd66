"""Load benchmark of the Ray Serve endpoint: N concurrent clients, speculation on (radar / tree:D) against off.

Starts Serve on 127.0.0.1 with the pair (default: SmolLM2-135M-Instruct, its EAGLE-3 head and the bundled controllers), or uses a running
server (--url). First a reference pass: every prompt once, alone, at temperature 0 with speculation off. Then for
each speculation mode a load phase: --clients concurrent httpx clients send --requests requests in all (prompt i
is prompts[i % len(prompts)]), stopping early after --duration seconds. Every response must equal the reference
text for its prompt (decoding is lossless, so concurrency and speculation must not change it).

Reports per mode: requests/s, p50/p99 latency, completion tokens/s, errors, mismatches, mean tau, draft calls per
cycle and the server's queue wait; writes benchmarks/results/serve-load-<name>.json.

    python benchmarks/bench_serve.py --clients 8 --requests 64                      # the default pair
    python benchmarks/bench_serve.py --model T --draft D --controller C --modes off,radar,tree:4
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --api-key KEY       # a running `radar serve`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def request_body(prompt: str, args, speculation: str) -> tuple[str, dict]:
    """(path, JSON body) of one greedy request."""
    common = {"max_tokens": args.max_tokens, "temperature": 0, "seed": 0, "speculation": speculation}
    if args.endpoint == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **common}
    return "/v1/completions", {"prompt": prompt, **common}


def response_text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


async def reference_pass(client: httpx.AsyncClient, prompts: list[str], args) -> list[str]:
    """Each prompt alone, speculation off: the text every later response must equal."""
    texts = []
    for p in prompts:
        path, body = request_body(p, args, "off")
        r = await client.post(path, json=body)
        r.raise_for_status()
        texts.append(response_text(r.json()))
    return texts


async def load_phase(client: httpx.AsyncClient, prompts: list[str], reference: list[str], args, mode: str) -> dict:
    """--clients workers share --requests requests (bounded by --duration); returns the mode's figures."""
    next_index = iter(range(args.requests))
    records: list[dict] = []
    t0 = time.perf_counter()
    stop_at = t0 + args.duration

    async def worker() -> None:
        for i in next_index:  # a shared iterator: each request index is taken by exactly one worker
            if time.perf_counter() > stop_at:
                return
            k = i % len(prompts)
            path, body = request_body(prompts[k], args, mode)
            start = time.perf_counter()
            rec = {"prompt": k, "status": None}
            try:
                r = await client.post(path, json=body)
                rec["status"] = r.status_code
                if r.status_code == 200:
                    data = r.json()
                    rec.update(tokens=data["usage"]["completion_tokens"], match=response_text(data) == reference[k],
                               tau=data["speculation"]["tau"], draft_calls=data["speculation"]["draft_calls_per_cycle"],
                               queue_s=data["speculation"]["queue_s"], decode_s=data["speculation"]["decode_s"])
                else:
                    rec["error"] = r.text[:200]
            except httpx.HTTPError as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["latency_s"] = time.perf_counter() - start
            records.append(rec)

    await asyncio.gather(*(worker() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in records if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    mean = lambda key: statistics.fmean(r[key] for r in ok) if ok else None  # noqa: E731
    return {
        "speculation": mode, "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "error_samples": [r.get("error") for r in records if r["status"] != 200][:3],
        "mismatches": sum(1 for r in ok if not r["match"]), "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None, "tokens_per_s": tokens / wall if wall else None,
        "completion_tokens": tokens,
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "latency_max_s": max(lat, default=None),
        "server_decode_tokens_per_s": tokens / sum(r["decode_s"] for r in ok) if ok else None,
        "mean_queue_s": mean("queue_s"), "mean_tau": mean("tau"), "mean_draft_calls_per_cycle": mean("draft_calls"),
        "stopped_by_duration": len(records) < args.requests,
    }


def start_server(args) -> tuple[str, dict]:
    """Start Ray and Serve locally with the pair from the arguments; returns (base URL, the config used)."""
    import ray

    from radar.ops.models import model_paths
    from radar.serve.app import run
    from radar.serve.config import ServeConfig

    target, draft = model_paths(args.model, args.draft)
    port = args.port
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cfg = ServeConfig(model=str(target), draft=str(draft) if draft else None, controller=args.controller,
                      model_name="bench", replicas=args.replicas, num_cpus=args.num_cpus, port=port,
                      timeout_s=args.timeout, api_key="", device=args.device,
                      max_ongoing_requests=max(32, args.clients))
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                       "TOKENIZERS_PARALLELISM": "false"}})
    return run(cfg), cfg.model_dump(exclude={"api_key"})


async def bench(args, url: str) -> dict:
    from radar.common.prompts import load_prompts

    prompts = [p.text for p in load_prompts(args.prompts, args.limit)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout + 10, limits=limits) as client:
        t0 = time.perf_counter()
        reference = await reference_pass(client, prompts, args)
        reference_s = time.perf_counter() - t0
        phases = []
        for mode in args.modes:
            phase = await load_phase(client, prompts, reference, args, mode)
            phases.append(phase)
            print(f"{mode:>8}: {phase['ok']}/{phase['requests']} ok, {phase['requests_per_s']:.2f} req/s, "
                  f"p50 {phase['latency_p50_s']:.3f}s p99 {phase['latency_p99_s']:.3f}s, "
                  f"{phase['tokens_per_s']:.1f} tok/s, tau {phase['mean_tau'] or 0:.2f}, "
                  f"errors {phase['errors']}, mismatches {phase['mismatches']}", flush=True)
    off = next((p for p in phases if p["speculation"] == "off"), None)
    for p in phases:
        p["throughput_vs_off"] = (p["tokens_per_s"] / off["tokens_per_s"]) if off and off["tokens_per_s"] else None
    return {"prompts": args.prompts, "n_prompts": len(prompts), "reference_pass_s": reference_s,
            "all_match_single_request_output": all(p["mismatches"] == 0 and p["errors"] == 0 for p in phases),
            "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="Benchmark a running server instead of starting one.")
    ap.add_argument("--api-key", default=os.environ.get("RADAR_API_KEY"))
    ap.add_argument("--model", help="Target checkpoint directory. Default: SmolLM2-135M-Instruct + its EAGLE-3 head.")
    ap.add_argument("--draft")
    ap.add_argument("--controller", help="Controller for radar. Default: the bundled controllers.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica.")
    ap.add_argument("--port", type=int, help="Default: a free port on 127.0.0.1.")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help="Requests per speculation mode.")
    ap.add_argument("--duration", type=float, default=300.0, help="Seconds per mode at most.")
    ap.add_argument("--timeout", type=float, default=300.0, help="Per-request timeout (server and client).")
    ap.add_argument("--modes", default="off,radar", help="Comma-separated: off, radar, tree:D.")
    ap.add_argument("--prompts", default="mt_bench", help="Bundled set or jsonl file.")
    ap.add_argument("--limit", type=int, default=8, help="Distinct prompts, cycled through.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    ap.add_argument("--name", help="Results go to benchmarks/results/serve-load-<name>.json. Default: the model dir.")
    ap.add_argument("--out", type=Path, help="Explicit results path.")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    server_cfg = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        url, server_cfg = start_server(args)
    try:
        result = asyncio.run(bench(args, url))
    finally:
        if not args.url:
            from ray import serve

            serve.shutdown()
    name = args.name or (Path(args.model).name if args.model else "smollm2")
    out = args.out or RESULTS / f"serve-load-{name}.json"
    result.update(
        url=url, clients=args.clients, requests_per_mode=args.requests, max_tokens=args.max_tokens,
        endpoint=args.endpoint, server_config=server_cfg, cpu_count=os.cpu_count(), machine=platform.machine(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), when=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"all responses equal the single-request output: {result['all_match_single_request_output']}; -> {out}")


if __name__ == "__main__":
    main()
