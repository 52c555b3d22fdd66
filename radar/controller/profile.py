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
    ar_step  one plain one-token target forward on the same prefix, plus picking the token.

Each is the median of `repeats` timed runs after warm-up runs that are not counted; on a GPU every timing ends with
`torch.cuda.synchronize`. Costs outside these (rerank, the acceptance walk, cache compaction) are measured too and
kept in `meta["cycle_overhead_s"]`, not added to T_0.
"""

from __future__ import annotations

import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from radar.controller.collect import model_names
from radar.controller.mdp import CostModel
from radar.controller.policy import ControllerPolicy, LSTMController
from radar.decoding.drafters import SmallLMDrafter
from radar.decoding.generate import _sync, commit_path, verify_tree
from radar.decoding.pair import ModelPair
from radar.decoding.tree import FixedDepth, TreeConfig, draft_pool, select_tree
from radar.decoding.verify import Sampling, next_token, walk


class _CallClock:
    """A stop policy that never stops and notes the time of every query: consecutive queries bracket one call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def reset(self) -> None:
        self.stamps = []

    def decide(self, calls: int, frontier_scores: torch.Tensor) -> bool:
        _sync(self.device)
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
        _sync(self.device)
        t0 = time.perf_counter()
        self.inner.decide(calls, frontier_scores)
        _sync(self.device)
        if self.counting:
            self.times.append(time.perf_counter() - t0)
        return True


def _timed(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall times of `repeats` calls of fn() after `warmup` uncounted ones."""
    out = []
    for r in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if r >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
) -> CostModel:
    """Measure T_0, T_f, T_eye and ar_step (seconds, medians) for `pair`; save the cost file to `out` if given."""
    if pair.draft is None:
        raise ValueError("profiling needs a draft model (--draft PATH)")
    if t_max < 2:
        raise ValueError("t_max must be >= 2 to time a draft call between two controller queries")
    if repeats < 1 or prompt_tokens < 1:
        raise ValueError("repeats and prompt_tokens must be >= 1")
    total_tokens = pair.tree.total_tokens if total_tokens is None else total_tokens
    warmup = max(2, repeats // 4) if warmup is None else warmup
    target, device = pair.target, pair.target.device
    cfg = TreeConfig(branching=k, max_calls=t_max, total_tokens=total_tokens)
    if prompt_tokens + t_max + 1 > target.config.max_position_embeddings:
        raise ValueError(
            f"prompt_tokens={prompt_tokens} plus a {t_max}-deep tree does not fit the target's context of "
            f"{target.config.max_position_embeddings} tokens; use a smaller --prompt-tokens"
        )

    # A prefix of random tokens: the content does not change the cost of a forward of a given shape.
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, target.config.vocab_size, (prompt_tokens,), generator=gen).to(device)
    prefix_len, root_pos = prompt_tokens - 1, prompt_tokens - 1
    max_len = prompt_tokens + cfg.max_nodes + 2
    cache = target.new_cache(max_len)
    if prefix_len:
        target(prompt[None, :prefix_len], cache=cache)
    drafter = SmallLMDrafter(pair.draft)
    drafter.begin(max_len)
    if prefix_len:
        drafter.forward(prompt[:prefix_len], torch.arange(prefix_len, device=device), None)
    pending = prompt[prefix_len:]

    # T_f: the draft calls of full t_max-call pools, each bracketed by two policy queries.
    clock, call_times = _CallClock(device), []
    cfg_clock = TreeConfig(branching=k, max_calls=t_max + 1, total_tokens=total_tokens)  # a query after call t_max
    for r in range(warmup + repeats):
        drafter.keep(prefix_len, [])
        clock.reset()
        draft_pool(drafter, pending, root_pos, cfg_clock, clock)
        if r >= warmup:  # queries before calls 2..t_max+1 bracket calls 2..t_max
            call_times += [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    drafter.keep(prefix_len, [])
    pool = draft_pool(drafter, pending, root_pos, cfg, FixedDepth(t_max))
    tree = select_tree(pool, total_tokens)

    # T_0: verification forward of root + tree on the prefix cache.
    def verify():
        cache.length = prefix_len
        verify_tree(target, cache, pending, tree, root_pos)

    verify_times = _timed(verify, device, repeats, warmup)

    # Per-cycle bookkeeping outside T_0 and T_f (for reference): rerank, acceptance walk, cache compaction.
    cache.length = prefix_len
    logits, base = verify_tree(target, cache, pending, tree, root_pos)
    greedy = Sampling()

    def overhead():  # only timed: the caches' contents past the prefix are garbage afterwards, and unused
        t = select_tree(pool, total_tokens)
        path, _ = walk(t, logits, greedy)
        commit_path(cache, drafter, t, path, base)

    overhead_times = _timed(overhead, device, repeats, warmup)

    # T_eye: one controller decision, timed where decisions really happen: inside draft pools, between draft and
    # target forwards. In isolation the same decision measured about 3x cheaper, because the forwards evict the
    # controller's weights from the CPU caches.
    policy = _TimedDecisions(ControllerPolicy(controller or LSTMController(), greedy=True, seed=seed), device)
    for r in range(warmup + repeats):
        drafter.keep(prefix_len, [])
        policy.reset()
        policy.counting = r >= warmup
        draft_pool(drafter, pending, root_pos, cfg, policy)
        verify()
    eye_times = policy.times

    # ar_step: one plain one-token target forward on the prefix, plus choosing the token.
    def ar():
        cache.length = prefix_len
        next_token(target(pending[None, -1:], cache=cache)[0, -1], greedy, None)

    ar_times = _timed(ar, device, repeats, warmup)

    names = model_names(pair, target_name, draft_name)
    med = statistics.median
    cost = CostModel(
        T_0=med(verify_times),
        T_f=med(call_times),
        T_eye=med(eye_times),
        t_max=t_max,
        ar_step=med(ar_times),
        meta={
            "source": "radar.controller.profile.profile_costs",
            "device": _device_name(device),
            "dtype": str(target.dtype).removeprefix("torch."),
            "target": names[0],
            "draft": names[1],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "k": k,
            "total_tokens": total_tokens,
            "verified_tokens": 1 + len(tree),
            "prompt_tokens": prompt_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "statistic": "median",
            "cycle_overhead_s": med(overhead_times),
            "spread_s": {
                name: [min(v), max(v)]
                for name, v in (("T_0", verify_times), ("T_f", call_times), ("T_eye", eye_times), ("ar_step", ar_times))
            },
        },
    )
    if out is not None:
        cost.save(out)
    return cost


__all__ = ["profile_costs"]
