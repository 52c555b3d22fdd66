"""One controller decision on the CPU as a single compiled call (Numba).

A decision is paid before every draft call (T_eye in the cost model), and on a CPU its cost is not arithmetic (a
128-unit LSTM step is ~85k multiply-adds) but overhead: dispatching ~20 NumPy or ~40 PyTorch operations, each of
which runs cold because the draft forward between two decisions evicts the interpreter's and the libraries' working
set. One compiled call pays that dispatch once (benchmarks/README.md, "Figures that used to live in docstrings").
Same arithmetic as `LSTMController.step` in eval mode, in float32.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import nn

from radar.controller.state import PAD_LOGPROB


@numba.njit(cache=True, nogil=True)
def _decide(scores, k, w_in, w_rec, bias, w_head, b_head, w_out, b_out, h, c):  # pragma: no cover - compiled
    """Continue-minus-stop logit for frontier `scores`; updates the per-layer LSTM state (h, c) in place.

    w_in (k + H, 4H): layer 0's [W_ih | W_hh] transposed; w_rec (L - 1, 2H, 4H): the same for layers 1..L-1;
    bias (L, 4H): b_ih + b_hh; w_head (H + k, M): the head's first layer transposed; w_out (M,): stop-to-continue
    row difference of the last layer, b_out its bias difference. Transposed weights make every product a run of
    contiguous axpys, which compile to vector code without reordering any sum.
    """
    layers, hidden = h.shape
    pad = np.float32(PAD_LOGPROB)
    # The state: the k best scores, descending, NaN and -inf mapped to the pad (as `frontier_state`).
    x = np.full(k, pad, np.float32)
    filled = 0
    for v in scores:
        v = np.float32(v)
        if not v > pad:  # also true for NaN
            v = pad
        if filled < k:
            j = filled
            filled += 1
        elif v > x[k - 1]:
            j = k - 1
        else:
            continue
        while j > 0 and x[j - 1] < v:
            x[j] = x[j - 1]
            j -= 1
        x[j] = v

    inp = x
    for layer in range(layers):
        gates = bias[layer].copy()
        w = w_in if layer == 0 else w_rec[layer - 1]
        n_in = inp.shape[0]
        for j in range(n_in):
            gates += w[j] * inp[j]
        for j in range(hidden):
            gates += w[n_in + j] * h[layer, j]
        # PyTorch's gate order: input, forget, cell, output. sigmoid(z) = (1 + tanh(z / 2)) / 2 cannot overflow.
        for j in range(hidden):
            i_g = np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * gates[j])
            f_g = np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * gates[hidden + j])
            o_g = np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * gates[3 * hidden + j])
            c[layer, j] = f_g * c[layer, j] + i_g * np.tanh(gates[2 * hidden + j])
            h[layer, j] = o_g * np.tanh(c[layer, j])
        inp = h[layer]

    # Head on concat(h_top, x): Linear -> ReLU -> Linear, reduced to the logit difference.
    z = b_head.copy()
    for j in range(hidden):
        z += w_head[j] * inp[j]
    for j in range(k):
        z += w_head[hidden + j] * x[j]
    diff = b_out
    for m in range(z.shape[0]):
        if z[m] > 0:
            diff += w_out[m] * z[m]
    return diff


class CpuStep:
    """A controller's decisions on the CPU: `decide(scores, fresh)` -> continue-minus-stop logit, LSTM state kept here.

    `controller` is an `LSTMController` (typed as a module: policy.py builds CpuSteps, so this file cannot import
    it back). Weights are copied out of it (transposed, float32) when this is built; the kernel is compiled on
    first use in a process and cached on disk by Numba after that.
    """

    def __init__(self, controller: nn.Module):
        lstm, cfg = controller.lstm, controller.config
        hidden, layers = cfg.hidden_size, cfg.num_layers

        def f32(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().float().cpu().numpy())

        with torch.no_grad():
            stacked = [torch.cat((getattr(lstm, f"weight_ih_l{i}"), getattr(lstm, f"weight_hh_l{i}")), 1).T
                       for i in range(layers)]
            self.w_in = f32(stacked[0])
            self.w_rec = f32(torch.stack(stacked[1:])) if layers > 1 else np.zeros((0, 2 * hidden, 4 * hidden),
                                                                                   np.float32)
            self.bias = f32(torch.stack([getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")
                                         for i in range(layers)]))
            first, last = controller.mlp[0], controller.mlp[3]
            self.w_head, self.b_head = f32(first.weight.T), f32(first.bias)
            self.w_out = f32(last.weight[1] - last.weight[0])
            self.b_out = np.float32(last.bias[1] - last.bias[0])
        self.k = cfg.input_size
        self.h = np.zeros((layers, hidden), np.float32)
        self.c = np.zeros((layers, hidden), np.float32)
        self.decide(np.zeros(0, np.float32), fresh=True)  # compile (or load from cache) now, not mid-request

    def decide(self, scores: np.ndarray, fresh: bool) -> float:
        """Continue-minus-stop logit for one decision; `fresh` starts a cycle (zero LSTM state)."""
        if fresh:
            self.h.fill(0.0)
            self.c.fill(0.0)
        return _decide(scores, self.k, self.w_in, self.w_rec, self.bias, self.w_head, self.b_head, self.w_out,
                       self.b_out, self.h, self.c)
