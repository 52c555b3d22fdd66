"""Triton kernel for tree verification's attention: new queries over a sequence's cached prefix plus its tree.

PyTorch's SDPA needs the whole (Q, L) boolean mask materialised, which for a tree is all ones but for the last
columns. The kernel reads only the (Q, T) tree part and treats every earlier slot as visible, streams the keys in
blocks with an online softmax in float32 (FlashAttention's recurrence), and maps query heads to their key/value
head for grouped-query attention without repeating the cache. Used on CUDA by packed forwards
(`radar.decoding.packed`); tested against `attend` under TRITON_INTERPRET=1 (tests/test_kernels.py). No GPU was
lent to this project's sessions yet, so it has no timings against SDPA (benchmarks/README.md says so).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, Windows): CUDA packed forwards fall back to SDPA
    triton = None


if triton is not None:

    @triton.jit
    def _tree_attention_kernel(Q, K, V, M, O, scale, n_q, n_kv, prefix,
                               sqh, sqq, skh, skl, svh, svl, soh, soq, smq,
                               GROUP: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr,
                               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
        head, block = tl.program_id(0), tl.program_id(1)
        kv_head = head // GROUP
        rq = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        rd = tl.arange(0, BLOCK_D)
        q_ok, d_ok = rq < n_q, rd < D
        q = tl.load(Q + head * sqh + rq[:, None] * sqq + rd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_Q,), -1e30, tl.float32)  # finite: a padding row must not turn into NaN
        l_i = tl.zeros((BLOCK_Q,), tl.float32)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
        for lo in range(0, n_kv, BLOCK_L):
            rl = lo + tl.arange(0, BLOCK_L)
            kv_ok = rl < n_kv
            k = tl.load(K + kv_head * skh + rl[:, None] * skl + rd[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale
            visible = q_ok[:, None] & kv_ok[None, :]
            if HAS_MASK:
                col = rl[None, :] - prefix  # column in the tree part; negative: the committed prefix
                tree = tl.load(M + rq[:, None] * smq + col, mask=visible & (col >= 0), other=0)
                visible = visible & ((col < 0) | (tree != 0))
            s = tl.where(visible, s, -1e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.where(visible, tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(V + kv_head * svh + rl[:, None] * svl + rd[None, :], mask=kv_ok[:, None] & d_ok[None, :],
                        other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(O + head * soh + rq[:, None] * soq + rd[None, :], out.to(O.dtype.element_ty),
                 mask=q_ok[:, None] & d_ok[None, :])


def tree_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (H, Q, D) over k, v (H_kv, L, D): every query sees the first L - T slots
    and, of the last T, those `tree` (Q, T) bool marks (None: all of them)."""
    if triton is None:
        raise RuntimeError("the Triton tree-attention kernel needs the triton package (pip install triton)")
    n_heads, n_q, dim = q.shape
    n_kv_heads, n_kv, _ = k.shape
    width = tree.shape[1] if tree is not None else 0
    if n_heads % n_kv_heads or k.shape != v.shape or tree is not None and (tree.shape[0] != n_q or width > n_kv):
        raise ValueError(f"tree_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"tree {None if tree is None else tuple(tree.shape)} do not fit together")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mask = (tree if tree is not None else torch.ones(1, 1, dtype=torch.bool, device=q.device)).to(torch.int8)
    mask = mask.contiguous()
    block_q = 16 if n_q <= 16 else 32  # tl.dot needs tiles of 16 at least
    grid = (n_heads, triton.cdiv(n_q, block_q))
    _tree_attention_kernel[grid](
        q, k, v, mask, out, 1.0 / math.sqrt(dim), n_q, n_kv, n_kv - width,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        mask.stride(0), GROUP=n_heads // n_kv_heads, HAS_MASK=tree is not None, BLOCK_Q=block_q, BLOCK_L=32,
        BLOCK_D=triton.next_power_of_2(dim), D=dim)
    return out


def tree_attention(xq, xk, xv, tree, layer_cache: tuple[torch.Tensor, torch.Tensor], start: int) -> torch.Tensor:
    """`radar.decoding.model.attend` for one sequence (batch 1) on the kernel: caches the new keys, then attends
    over the cache, every slot visible but the last T, of which `tree` (Q, T) says which (None: all)."""
    (k_cache, v_cache), end = layer_cache, start + xk.shape[2]
    k_cache[:, :, start:end], v_cache[:, :, start:end] = xk, xv
    out = tree_attention_kernel(xq[0].to(k_cache.dtype), k_cache[0, :, :end], v_cache[0, :, :end], tree)
    return out[None]


def triton_ready() -> bool:
    """Whether the kernel can run here (Triton installed; packed forwards use it on CUDA only)."""
    return triton is not None
