"""Load benchmark of the Ray Serve endpoint: server configurations x concurrent clients x temperatures.

Starts Serve on 127.0.0.1 with the pair (default: SmolLM2-135M-Instruct, its EAGLE-3 head and the bundled
controllers), or uses a running server (--url, one configuration). Configurations (--configs):

    fifo         one request at a time per replica (max_batch_size 1), speculation radar: the pre-batching server
    batch-off    continuous batching (16), speculation off
    batch-tree   continuous batching, a fixed tree (--tree, not load-aware)
    batch-radar  continuous batching, radar with load-aware speculation

First a reference pass on the first configuration: every prompt alone at temperature 0 with speculation off. Then
for each configuration, temperature and client count, a load phase: that many concurrent streaming clients send
--requests-per-client requests each (prompt i is prompts[i % len(prompts)]), stopping early after --duration
seconds. At temperature 0 every response must equal the reference text for its prompt (decoding is lossless, so
batching and speculation must not change it).

Reports per phase: requests/s, output tokens/s, p50/p99 time to first token and latency, errors, mismatches, mean
tau and draft calls per cycle; writes benchmarks/results/serve-load-<name>.json.

    python benchmarks/bench_serve.py                                         # the default pair, the whole grid
    python benchmarks/bench_serve.py --configs fifo,batch-radar --client-levels 16 --temperatures 0
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


def request_body(prompt: str, args, speculation: str | None, temperature: float, stream: bool) -> tuple[str, dict]:
    """(path, JSON body) of one request."""
    common = {"max_tokens": args.max_tokens, "temperature": temperature, "seed": 0, "stream": stream}
    if speculation is not None:
        common["speculation"] = speculation
    if stream:
        common["stream_options"] = {"include_usage": True}
    if args.endpoint == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **common}
    return "/v1/completions", {"prompt": prompt, **common}


def chunk_text(chunk: dict) -> str:
    choice = chunk["choices"][0]
    return (choice.get("delta") or {}).get("content") or "" if "delta" in choice else choice.get("text") or ""


async def streamed(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """One streamed request: its text, time to first token, latency, usage and speculation statistics."""
    start, first, text, last = time.perf_counter(), None, [], {}
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode()[:200],
                    "latency_s": time.perf_counter() - start}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices"):
                piece = chunk_text(chunk)
                if piece and first is None:
                    first = time.perf_counter() - start
                text.append(piece)
            if "error" in chunk:
                return {"status": 500, "error": str(chunk["error"])[:200], "latency_s": time.perf_counter() - start}
            last.update({k: chunk[k] for k in ("usage", "speculation") if chunk.get(k)})
    return {"status": 200, "text": "".join(text), "ttft_s": first, "latency_s": time.perf_counter() - start,
            "tokens": last["usage"]["completion_tokens"], "tau": last["speculation"]["tau"],
            "draft_calls": last["speculation"]["draft_calls_per_cycle"]}


async def reference_pass(client: httpx.AsyncClient, prompts: list[str], args) -> list[str]:
    """Each prompt alone, speculation off, greedy: the text every later greedy response must equal."""
    texts = []
    for p in prompts:
        rec = await streamed(client, *request_body(p, args, "off", 0.0, True))
        if rec["status"] != 200:
            raise SystemExit(f"reference request failed: {rec['error']}")
        texts.append(rec["text"])
    return texts


PER_REQUEST = ("prompt", "start_s", "ttft_s", "latency_s", "tokens", "tau", "draft_calls")  # kept for each request


async def load_phase(client: httpx.AsyncClient, prompts: list[str], reference: list[str], args, speculation,
                     clients: int, temperature: float) -> dict:
    """`clients` workers share clients * --requests-per-client requests (bounded by --duration)."""
    n_requests = clients * args.requests_per_client
    next_index = iter(range(n_requests))
    records: list[dict] = []
    t0 = time.perf_counter()
    stop_at = t0 + args.duration

    async def worker() -> None:
        for i in next_index:  # a shared iterator: each request index is taken by exactly one worker
            if time.perf_counter() > stop_at:
                return
            k, began = i % len(prompts), time.perf_counter() - t0
            try:
                rec = await streamed(client, *request_body(prompts[k], args, speculation, temperature, True))
            except httpx.HTTPError as exc:
                rec = {"status": None, "error": f"{type(exc).__name__}: {exc}", "latency_s": None}
            rec["prompt"], rec["start_s"] = k, began
            if rec["status"] == 200 and temperature == 0:
                rec["match"] = rec["text"] == reference[k]
            records.append(rec)

    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in records if r["status"] == 200]
    lat, ttft = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    mean = lambda key: statistics.fmean(r[key] for r in ok) if ok else None  # noqa: E731
    return {
        "clients": clients, "temperature": temperature, "requests": len(records), "ok": len(ok),
        "errors": len(records) - len(ok), "error_samples": [r.get("error") for r in records if r["status"] != 200][:3],
        "mismatches": sum(1 for r in ok if r.get("match") is False), "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None, "tokens_per_s": tokens / wall if wall else None,
        "completion_tokens": tokens, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "mean_tau": mean("tau"), "mean_draft_calls_per_cycle": mean("draft_calls"),
        "stopped_by_duration": len(records) < n_requests,
        "per_request": [{k: r.get(k) for k in PER_REQUEST} for r in ok],
    }


CONFIGS = {  # name -> (ServeConfig fields, the speculation requests ask for)
    "fifo": ({"max_batch_size": 1, "load_aware": False}, "radar"),
    "batch-off": ({"max_batch_size": 16, "load_aware": False}, "off"),
    "batch-tree": ({"max_batch_size": 16, "load_aware": False}, "TREE"),
    "batch-radar": ({"max_batch_size": 16, "load_aware": True}, "radar"),
}


def start_server(args, fields: dict) -> tuple[str, dict]:
    """Deploy the pair from the arguments with `fields` on a local Serve (started once); returns (URL, config)."""
    import ray

    from radar.ops.models import model_paths
    from radar.serve.app import run
    from radar.serve.config import ServeConfig

    target, draft = model_paths(args.model, args.draft)
    if args.port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    cfg = ServeConfig(model=str(target), draft=str(draft) if draft else None, controller=args.controller,
                      model_name="bench", replicas=args.replicas, num_cpus=args.num_cpus, port=args.port,
                      timeout_s=args.timeout, api_key="", device=args.device, dtype=args.precision,
                      torch_threads=args.threads, max_queue=256, max_ongoing_requests=300, **fields)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                           "TOKENIZERS_PARALLELISM": "false"}})
    return run(cfg), cfg.model_dump(exclude={"api_key"})


async def bench_config(args, url: str, name: str, speculation: str | None, reference: list[str] | None,
                       prompts: list[str]) -> tuple[list[dict], list[str]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    top = max(args.client_levels) + 2
    limits = httpx.Limits(max_connections=top, max_keepalive_connections=top)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout + 10, limits=limits) as client:
        if reference is None:
            reference = await reference_pass(client, prompts, args)
        phases = []
        for temperature in args.temperatures:
            for clients in args.client_levels:
                phase = await load_phase(client, prompts, reference, args, speculation, clients, temperature)
                phase.update(config=name, speculation=speculation)
                phases.append(phase)
                print(f"{name:>11} T={temperature:g} {clients:>2} clients: {phase['ok']}/{phase['requests']} ok, "
                      f"{phase['requests_per_s']:.2f} req/s, {phase['tokens_per_s']:.1f} tok/s, "
                      f"ttft p50 {phase['ttft_p50_s'] or 0:.2f}s p99 {phase['ttft_p99_s'] or 0:.2f}s, latency p50 "
                      f"{phase['latency_p50_s'] or 0:.2f}s p99 {phase['latency_p99_s'] or 0:.2f}s, tau "
                      f"{phase['mean_tau'] or 0:.2f}, errors {phase['errors']}, mismatches {phase['mismatches']}",
                      flush=True)
    return phases, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="Benchmark a running server (one configuration) instead of starting one.")
    ap.add_argument("--api-key", default=os.environ.get("RADAR_API_KEY"))
    ap.add_argument("--model", help="Target checkpoint directory. Default: SmolLM2-135M-Instruct + its EAGLE-3 head.")
    ap.add_argument("--draft")
    ap.add_argument("--controller", help="Controller for radar. Default: the bundled controllers.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="Torch threads in the replica (default: its CPUs).")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica.")
    ap.add_argument("--port", type=int, help="Default: a free port on 127.0.0.1.")
    ap.add_argument("--configs", default="fifo,batch-off,batch-tree,batch-radar")
    ap.add_argument("--tree", default="tree:2", help="The fixed tree of batch-tree.")
    ap.add_argument("--client-levels", default="1,4,16")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--duration", type=float, default=240.0, help="Seconds per phase at most.")
    ap.add_argument("--timeout", type=float, default=300.0, help="Per-request timeout (server and client).")
    ap.add_argument("--prompts", default="benchmarks/prompts/live-unseen.jsonl", help="Bundled set or jsonl file.")
    ap.add_argument("--limit", type=int, default=40, help="Distinct prompts, cycled through.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    ap.add_argument("--name", help="Results go to benchmarks/results/serve-load-<name>.json. Default: the model dir.")
    ap.add_argument("--out", type=Path, help="Explicit results path.")
    args = ap.parse_args()
    args.client_levels = [int(c) for c in args.client_levels.split(",")]
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    from radar.common.prompts import load_prompts

    prompts = [p.text for p in load_prompts(args.prompts, args.limit)]
    phases, reference, configs = [], None, {}
    try:
        for name in names:
            fields, speculation = CONFIGS[name] if not args.url else ({}, None)
            speculation = args.tree if speculation == "TREE" else speculation
            if args.url:
                url = args.url.rstrip("/")
            else:
                url, configs[name] = start_server(args, fields)
            got, reference = asyncio.run(bench_config(args, url, name, speculation, reference, prompts))
            phases += got
            if args.url:
                break
    finally:
        if not args.url:
            from ray import serve

            serve.shutdown()
    name = args.name or (Path(args.model).name if args.model else "smollm2")
    out = args.out or RESULTS / f"serve-load-{name}.json"
    base = {(p["temperature"], p["clients"]): p["tokens_per_s"] for p in phases if p["config"] == names[0]}
    for p in phases:
        ref = base.get((p["temperature"], p["clients"]))
        p[f"tokens_per_s_vs_{names[0]}"] = p["tokens_per_s"] / ref if ref else None
    result = dict(
        prompts=args.prompts, n_prompts=len(prompts), phases=phases, url=url, max_tokens=args.max_tokens,
        all_greedy_match_single_request_output=all(p["mismatches"] == 0 and p["errors"] == 0 for p in phases),
        endpoint=args.endpoint, server_configs=configs, cpu_count=os.cpu_count(), machine=platform.machine(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), when=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"every greedy response equals the single-request output: "
          f"{result['all_greedy_match_single_request_output']}; -> {out}")


if __name__ == "__main__":
    main()
