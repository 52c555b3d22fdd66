"""Synthetic records from a calibrated toy drafter, for tests and demos: the best depth depends on the state."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from radar.controller.dataset import SCHEMA_VERSION, RecordSet


def synthetic_records(
    n: int,
    t_max: int = 8,
    k: int = 10,
    seed: int = 0,
    easy_fraction: float = 0.5,
    easy: tuple[float, float] = (0.85, 0.97),
    hard: tuple[float, float] = (0.05, 0.3),
    step_noise: float = 0.03,
    prefixes_per_prompt: int = 8,
) -> RecordSet:
    """Records from a calibrated toy drafter whose best depth depends on the state.

    Each record draws a per-prefix acceptance rate a (from `easy` with probability `easy_fraction`, else from
    `hard`) and per-step rates a_t = clip(a + noise). The best path's t-th token is accepted with probability a_t,
    so with reach_j = prod_{t <= j} a_t: d_i(j) = reach_j * (1 - a_{j+1}) for j < i and d_i(i) = reach_i (a chain,
    exactly what `acceptance_distribution` gives for a one-path tree). The drafter is calibrated: the frontier's best
    cumulative log-prob after t calls is sum_{t' <= t} log a_t'; the other k - 1 frontier scores lie below it by
    random gaps. Easy prefixes want deep trees and hard ones want one call, and s_1 already tells them apart.
    """
    if n < 1 or t_max < 1 or k < 1:
        raise ValueError("n, t_max and k must be >= 1")
    rng = np.random.default_rng(seed)
    easy_mask = rng.random(n) < easy_fraction
    a = np.where(easy_mask, rng.uniform(*easy, n), rng.uniform(*hard, n))
    a_t = np.clip(a[:, None] + step_noise * rng.standard_normal((n, t_max + 1)), 1e-3, 1 - 1e-3)
    log_reach = np.cumsum(np.log(a_t[:, :t_max]), axis=1)  # (n, t_max): log P(first t tokens accepted)
    gaps = np.cumsum(rng.exponential(0.7, (n, t_max, k)), axis=2)
    gaps[:, :, 0] = 0.0
    states = (log_reach[:, :, None] - gaps).astype(np.float32)
    states = np.maximum(states, -100.0)

    reach = np.concatenate([np.ones((n, 1)), np.exp(log_reach)], axis=1)  # reach_0..reach_tmax
    stop_here = reach[:, :t_max] * (1 - a_t[:, :t_max])  # P(l = j) for j < i, j = 0..t_max-1
    dists = np.zeros((n, t_max, t_max + 1))
    for i in range(1, t_max + 1):
        dists[:, i - 1, :i] = stop_here[:, :i]
        dists[:, i - 1, i] = reach[:, i]
    meta = pd.DataFrame({
        "prompt_id": [f"synthetic-{j // prefixes_per_prompt}" for j in range(n)],
        "position": [j % prefixes_per_prompt for j in range(n)],
        "target": "synthetic", "draft": "synthetic", "temperature": 1.0, "budget": t_max,
        "schema_version": SCHEMA_VERSION,
    })
    depth = np.arange(1, t_max + 1)
    nodes = np.stack(np.broadcast_arrays(depth[None] - 2, depth[None], log_reach, a_t[:, :t_max]), -1)  # one path
    return RecordSet(torch.from_numpy(states), torch.from_numpy(dists.astype(np.float32)), meta,
                     torch.from_numpy(nodes.astype(np.float32)))


__all__ = ["synthetic_records"]
