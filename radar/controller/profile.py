"""Measure the cost model's constants (paper Eq. 6) for a model pair on this machine: the cost file.

    T_0      one target verification forward of a full tree: the root plus `total_tokens` tree nodes (the tree
             the engine builds with t_max calls, tree attention mask included) on a cache holding a
             `prompt_tokens`-long prefix.
    T_f      one draft call: a k-node frontier forward of the drafter plus the top-k bookkeeping, timed inside
             `draft_pool` itself (the time between consecutive stop-policy queries is exactly one call of calls
             2..t_max, mask building, forward, top-k and pool updates included).
    T_eye    one `ControllerPolicy.decide` (of `controller`, default a default-size `LSTMController`) inside real draft
             pools, between the model forwards, on their frontier scores (state building and
             one LSTM step).
    ar_step  seconds per token of the AR loop: the bare one-token target forward on the prefix (kept in meta as
             `ar_forward`) plus what the AR loop itself (`ModelPair.generate` with method ar, between commits) spends
             per token beyond its target forward, decoding `loop_tokens` tokens after the prefix.

    verify_s the verification curve: the same forward over the root plus n tree tokens for n = 1, 2, ... up to
             twice the budget (trees `select_tree` cuts from one full pool), since on a CPU its cost grows with n;
             made non-decreasing (`monotone`; the medians as measured are kept in meta). Like the live one, it
             captures the target's features when the drafter reads them.
    T_c      what a live cycle costs beyond its verification forward and T_f per draft call, measured in the loop:
             speculative decodes of `loop_tokens` tokens at fixed depths (1 and t_max), at the temperature the
             costs are for (a sampled walk costs more than an argmax), each cycle's time less its own verification
             forward (timed in that cycle) and T_f per call, averaged. It holds the rerank, the acceptance walk,
             cache compaction, the draft rounds' bookkeeping and the first draft call's feeding of the committed
             tokens. The bookkeeping alone, timed apart, is kept in meta (`T_c_bookkeeping`).

Every forward (T_0, the curve, ar_step's forward) is then priced at the loop's pace: scaled by the AR loop's
one-token forward, timed in the loop, over the same forward timed back to back (`forward_scale` in meta; the
microbenchmarks' own figures stay there too): on a CPU the loop's forwards run 5-10% slower, an error the
simulator's tokens/s otherwise carries whole (benchmarks/README.md).

Measuring the last two in the loop is what makes the simulator's tokens/s match a live run's: priced from
forwards alone, a gguf cycle came out about 1 ms (5-7%) short of the live one (benchmarks/README.md). Both subtract
forwards timed in the same cycles rather than the microbenchmarks' medians: on a shared CPU the machine's speed
moves by 10-20% within seconds, and a residual against forwards timed a minute earlier swung by 2-3 ms a cycle.

Each is the median of `repeats` timed runs after warm-up runs that are not counted; on a GPU every timing ends with
`torch.cuda.synchronize`.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from radar.controller.collect import model_names
from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerPolicy, LSTMController
from radar.decoding.drafters import Drafter
from radar.decoding.model import KVCache, LayerCapture
from radar.decoding.pair import ModelPair, precision_of
from radar.decoding.session import sync
from radar.decoding.stop import FixedDepth
from radar.decoding.tree import DraftPool, DraftTree, TreeConfig, draft_pool, select_tree
from radar.decoding.verify import Sampling, commit_path, verify_tree, walk


class _CallClock:
    """A stop policy that never stops and notes the time of every query: consecutive queries bracket one call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def reset(self) -> None:
        self.stamps = []

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return True


class _TimedDecisions:
    """Times every `decide` of a wrapped policy and always continues (so each pool makes all t_max calls)."""

    def __init__(self, inner: ControllerPolicy, device: torch.device):
        self.inner, self.device = inner, device
        self.times: list[float] = []
        self.counting = True

    def reset(self) -> None:
        self.inner.reset()

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        sync(self.device)
        t0 = time.perf_counter()
        self.inner.decide(calls, frontier_scores)
        sync(self.device)
        if self.counting:
            self.times.append(time.perf_counter() - t0)
        return True


def _timed(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall times of `repeats` calls of fn() after `warmup` uncounted ones."""
    out = []
    for r in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if r >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _check_settings(pair: ModelPair, t_max: int, prompt_tokens: int, repeats: int) -> None:
    """One-line errors for settings `profile_costs` cannot measure with."""
    if pair.draft is None:
        raise ValueError("profiling needs a draft model (--draft PATH)")
    if t_max < 2:
        raise ValueError("t_max must be >= 2 to time a draft call between two controller queries")
    if repeats < 1 or prompt_tokens < 1:
        raise ValueError("repeats and prompt_tokens must be >= 1")
    context = pair.target.config.max_position_embeddings
    if prompt_tokens + t_max + 1 > context:
        raise ValueError(
            f"prompt_tokens={prompt_tokens} plus a {t_max}-deep tree does not fit the target's context of "
            f"{context} tokens; use a smaller --prompt-tokens"
        )


def _random_prompt(pair: ModelPair, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, pair.target.config.vocab_size, (n,), generator=gen).to(pair.target.device)


class _ForwardClock:
    """A model whose calls add their seconds to `seconds`; everything else is the wrapped model's."""

    def __init__(self, model: torch.nn.Module):
        self.wrapped, self.seconds = model, 0.0

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)

    def __call__(self, *args, **kwargs):
        sync(self.wrapped.device)
        start = time.perf_counter()
        out = self.wrapped(*args, **kwargs)
        sync(self.wrapped.device)
        self.seconds += time.perf_counter() - start
        return out


def _loop_times(pair: ModelPair, cfg: TreeConfig, t_f: float, prompt_tokens: int, tokens: int, runs: int,
                seed: int, sampling: Sampling) -> tuple[list[float], list[float], list[float]]:
    """(AR seconds per token beyond its target forward, AR's target forward per token, per-cycle seconds beyond
    the cycle's verification forward and `t_f` per draft call) of `runs` live decodes each, at fixed depths 1 and
    t_max, of `tokens` tokens from a random prompt (one uncounted warm-up decode first)."""
    ids = _random_prompt(pair, prompt_tokens, seed).tolist()
    clock = _ForwardClock(pair.target)
    loop = replace(pair, target=clock, tree=cfg)
    marks: list[tuple[float, float]] = []  # (time, target seconds so far) at each commit

    def mark(_) -> bool:
        marks.append((time.perf_counter(), clock.seconds))
        return True

    ar, ar_forward, residual = [], [], []
    for r in range(runs + 1):
        marks.clear()
        loop.generate(ids, "ar", sampling, tokens, seed=r, on_commit=mark)
        if r and len(marks) > 1:  # between the first and last commits: one forward and one pick per token
            (t0, f0), (t1, f1) = marks[0], marks[-1]
            ar.append(((t1 - t0) - (f1 - f0)) / (len(marks) - 1))
            ar_forward.append((f1 - f0) / (len(marks) - 1))
        for depth in sorted({1, cfg.max_calls}):
            marks.clear()
            stats = loop.generate(ids, f"tree:{depth}", sampling, tokens, seed=r, on_commit=mark).stats
            # The first cycle also feeds the drafter the whole prompt: a cost of the prompt, not of a cycle. Each
            # later cycle ends in a commit, so the target's seconds between the first and last commits are the
            # verifications of cycles 2..n.
            if r and len(stats.cycle_s) > 1 and len(marks) == len(stats.cycle_s):
                verify_s = marks[-1][1] - marks[0][1]
                beyond = sum(stats.cycle_s[1:]) - verify_s - t_f * sum(stats.draft_calls_per_cycle[1:])
                residual.append(beyond / (len(stats.cycle_s) - 1))
    return ar, ar_forward, residual


@dataclass
class _Bench:
    """Both models on one cached prefix of random tokens; every timed run restarts from that prefix."""

    cache: KVCache
    drafter: Drafter
    pending: torch.Tensor  # the root: the prefix's last token, which neither model has seen
    prefix_len: int
    draft_base: int  # the drafter's state length after the prefix
    root_features: torch.Tensor | None = None  # for a drafter reading the target: what it feeds the root with
    capture: LayerCapture | None = None  # the target's features a verification hands such a drafter

    @property
    def root_pos(self) -> int:
        return self.prefix_len

    def reset_drafter(self) -> None:
        """Back to the prefix alone, ready to draft after the root again."""
        self.drafter.keep(self.draft_base, [])
        if self.root_features is not None:
            self.drafter.observe_target(self.root_features)

    def verify(self, target: torch.nn.Module, tree: DraftTree) -> tuple[torch.Tensor, int]:
        """A verification of the root and `tree` on the prefix, as the loop runs it (features captured too)."""
        self.cache.length = self.prefix_len
        return verify_tree(target, self.cache, self.pending, tree, self.root_pos, self.capture)


def _bench(pair: ModelPair, prompt_tokens: int, max_len: int, seed: int) -> _Bench:
    """Prefill target and drafter with `prompt_tokens - 1` random tokens (content does not change a forward's cost)."""
    target, device = pair.target, pair.target.device
    prompt = _random_prompt(pair, prompt_tokens, seed)
    prefix_len = prompt_tokens - 1
    cache = target.new_cache(max_len)
    drafter = pair.drafter()
    drafter.begin(max_len)
    positions = torch.arange(prefix_len, device=device)
    if drafter.capture:  # an EAGLE-3 head: it feeds each token with the target's features of the one before
        if prefix_len < 2:
            raise ValueError("profiling a drafter that reads the target's features needs prompt_tokens >= 3")
        capture = LayerCapture(drafter.capture)
        target(prompt[None, :prefix_len], cache=cache, last_only=True, capture=capture)
        drafter.observe_target(capture.hidden[0, :-1])
        drafter.forward(prompt[:prefix_len], positions, None)
        return _Bench(cache, drafter, prompt[prefix_len:], prefix_len, drafter.length, capture.hidden[0, -1:], capture)
    if prefix_len:
        target(prompt[None, :prefix_len], cache=cache, last_only=True)
        drafter.forward(prompt[:prefix_len], positions, None)
    return _Bench(cache, drafter, prompt[prefix_len:], prefix_len, drafter.length)


def _draft_call_times(bench: _Bench, cfg: TreeConfig, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """T_f samples: the draft calls of full t_max-call pools, each bracketed by two policy queries."""
    clock, times = _CallClock(device), []
    cfg_clock = TreeConfig(cfg.branching, cfg.max_calls + 1, cfg.total_tokens)  # a query after call t_max too
    for r in range(warmup + repeats):
        bench.reset_drafter()
        clock.reset()
        draft_pool(bench.drafter, bench.pending, bench.root_pos, cfg_clock, clock)
        if r >= warmup:  # queries before calls 2..t_max+1 bracket calls 2..t_max
            times += [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return times


def _decision_times(
    bench: _Bench, pool_cfg: TreeConfig, verify, controller: LSTMController, seed: int, repeats: int, warmup: int,
    device: torch.device,
) -> list[float]:
    """T_eye samples: one controller decision, timed where decisions really happen, inside draft pools between
    draft and target forwards. Timed in isolation it would look cheaper than it is, because the forwards evict
    the controller's weights from the CPU caches."""
    policy = _TimedDecisions(ControllerPolicy(controller, greedy=True, seed=seed), device)
    for r in range(warmup + repeats):
        bench.reset_drafter()
        policy.reset()
        policy.counting = r >= warmup
        draft_pool(bench.drafter, bench.pending, bench.root_pos, pool_cfg, policy)
        verify()
    return policy.times


def _overhead_times(
    bench: _Bench, pair: ModelPair, pool: DraftPool, tree: DraftTree, total_tokens: int, repeats: int, warmup: int
) -> list[float]:
    """Per-cycle bookkeeping outside T_0 and T_f (for reference): rerank, acceptance walk, cache compaction."""
    logits, base = bench.verify(pair.target, tree)

    def overhead():  # only timed: the caches' contents past the prefix are garbage afterwards, and unused
        t = select_tree(pool, total_tokens)
        path, _ = walk(t, logits, Sampling())
        commit_path(bench.cache, bench.drafter, t, path, base)

    return _timed(overhead, pair.target.device, repeats, warmup)


def curve_points(largest: int) -> list[int]:
    """Tree sizes the verification curve is measured at: every size up to 8, then about 1.5x apart, and `largest`."""
    points, n = list(range(1, min(largest, 8) + 1)), 8
    while n < largest:
        n = max(n + 1, round(n * 1.5))
        points.append(min(n, largest))
    return points


def _verify_curve(
    bench: _Bench, pair: ModelPair, pool: DraftPool, total_tokens: int, repeats: int, warmup: int
) -> dict[int, float]:
    """Median seconds of a verification over the root plus n tree tokens, for n up to twice the budget (trees
    `select_tree` makes from one full pool, so masks and depths are the engine's). The sizes take turns within
    each repeat, so a machine that slows down mid-run slows every size alike instead of bending the curve."""
    sizes = curve_points(min(len(pool.tokens), 2 * total_tokens))
    trees = {n: select_tree(pool, n) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    device = pair.target.device
    for r in range(warmup + repeats):
        for n in sizes:
            sync(device)
            t0 = time.perf_counter()
            bench.verify(pair.target, trees[n])
            sync(device)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): a bigger tree never costs
    less to verify, and on a shared CPU noise would otherwise say it does."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1), (m2, w2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]
    return [m for m, w in blocks for _ in range(int(w))]


@torch.inference_mode()
def profile_costs(
    pair: ModelPair,
    *,
    t_max: int = 8,
    k: int = 10,
    total_tokens: int | None = None,
    prompt_tokens: int = 128,
    repeats: int = 20,
    warmup: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    target_name: str | None = None,
    draft_name: str | None = None,
    controller: LSTMController | None = None,
    loop_tokens: int = 48,
    temperature: float = 0.0,
) -> CostModel:
    """Measure T_0, T_f, T_eye, the verification curve, T_c and ar_step (seconds) for `pair`, the last two in the
    decoding loop over `loop_tokens` tokens at `temperature` (sampling costs more per cycle than argmax: module
    docstring); save the cost file to `out` if given."""
    _check_settings(pair, t_max, prompt_tokens, repeats)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    total_tokens = pair.tree.total_tokens if total_tokens is None else total_tokens
    warmup = max(2, repeats // 4) if warmup is None else warmup
    target, device = pair.target, pair.target.device
    cfg = TreeConfig(branching=k, max_calls=t_max, total_tokens=total_tokens)
    bench = _bench(pair, prompt_tokens, prompt_tokens + cfg.max_nodes + 2, seed)

    call_times = _draft_call_times(bench, cfg, repeats, warmup, device)
    bench.reset_drafter()
    pool = draft_pool(bench.drafter, bench.pending, bench.root_pos, cfg, FixedDepth(t_max))
    tree = select_tree(pool, total_tokens)

    def verify():  # T_0: verification forward of root + tree on the prefix cache
        bench.verify(target, tree)

    def ar():  # ar_step's forward: one plain one-token target forward on the prefix
        bench.cache.length = bench.prefix_len
        target(bench.pending[None, -1:], cache=bench.cache)

    verify_times = _timed(verify, device, repeats, warmup)
    curve = _verify_curve(bench, pair, pool, total_tokens, repeats, warmup)
    overhead_times = _overhead_times(bench, pair, pool, tree, total_tokens, repeats, warmup)
    eye_times = _decision_times(bench, cfg, verify, controller or LSTMController(), seed, repeats, warmup, device)
    ar_times = _timed(ar, device, repeats, warmup)

    med = statistics.median
    forwards = CostModel(T_0=med(verify_times), T_f=med(call_times), T_eye=med(eye_times), t_max=t_max,
                         verify_tokens=list(curve), verify_s=monotone(list(curve.values())), budget=len(tree))
    loop_ar, loop_forward, loop_residual = _loop_times(pair, cfg, forwards.T_f, prompt_tokens, loop_tokens,
                                                       max(2, repeats // 10), seed, Sampling(temperature))
    # The loop's forwards run slower than the same forward timed back to back (a growing context, and caches left
    # cold by the draws and bookkeeping between them): every forward is priced at the loop's own pace.
    scale = statistics.fmean(loop_forward) / med(ar_times) if loop_forward else 1.0

    names = model_names(pair, target_name, draft_name)
    spread = {"T_0": verify_times, "T_f": call_times, "T_eye": eye_times, "ar_forward": ar_times,
              "ar_loop": loop_ar or [0.0], "T_c": loop_residual or overhead_times}
    meta = {
        "source": "radar.controller.profile.profile_costs", "device": _device_name(device),
        "precision": precision_of(target), "target": names[0], "draft": names[1],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "k": k, "total_tokens": total_tokens, "verified_tokens": 1 + len(tree), "prompt_tokens": prompt_tokens,
        "repeats": repeats, "warmup": warmup, "statistic": "median", "verify_s_measured": list(curve.values()),
        "spread_s": {name: [min(v), max(v)] for name, v in spread.items()},
        "loop_tokens": loop_tokens, "temperature": temperature, "ar_forward": med(ar_times),
        "T_c_bookkeeping": med(overhead_times), "forward_scale": scale, "T_0_microbench": forwards.T_0,
    }
    # Noise can leave the residual a little negative where T_f's median overprices the loop's draft calls.
    t_c = max(statistics.fmean(loop_residual), 0.0) if loop_residual else med(overhead_times)
    ar_step = med(ar_times) * scale + (statistics.fmean(loop_ar) if loop_ar else 0.0)
    cost = replace(forwards, T_0=forwards.T_0 * scale, verify_s=[v * scale for v in forwards.verify_s],
                   ar_step=ar_step, T_c=t_c, meta=meta)
    if out is not None:
        cost.save(out)
    return cost


__all__ = ["profile_costs"]
