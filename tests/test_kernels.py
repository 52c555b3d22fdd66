"""The Triton tree-attention kernel against PyTorch's attention, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set before Triton is imported, hence a child process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent('''
    import torch
    from radar.decoding.kernels import tree_attention
    from radar.decoding.model import attend, attention_mask

    torch.manual_seed(0)
    for heads, kv_heads, dim, start, q, width, dtype in [
        (4, 2, 16, 20, 5, 5, torch.float32),    # GQA, a verification: pending + tree
        (3, 3, 24, 0, 7, 7, torch.float64),     # no prefix, head dim not a power of 2, float64 (the CPU cache)
        (2, 1, 16, 37, 3, 9, torch.float32),    # a draft call: the tree part is wider than the new tokens
        (2, 2, 16, 50, 1, 1, torch.float32),    # one token, no mask
        (8, 2, 32, 5, 40, 40, torch.float32),   # more queries than one block
    ]:
        parents = torch.randint(0, 2, (q, width)).bool()
        tree = parents.clone()
        tree[:, width - q :] |= torch.eye(q, dtype=torch.bool)  # every new token sees itself
        tree = None if q == 1 else tree
        xq, xk, xv = (torch.randn(1, h, q, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
        caches = [(torch.randn(1, kv_heads, start + q + 4, dim, dtype=dtype),
                   torch.randn(1, kv_heads, start + q + 4, dim, dtype=dtype)) for _ in range(2)]
        caches[1] = (caches[0][0].clone(), caches[0][1].clone())
        mask = attention_mask(q, start, tree, "cpu") if tree is not None else None
        want = attend(xq, xk, xv, mask, caches[0], start)
        got = tree_attention(xq, xk, xv, tree, caches[1], start)
        tol = 1e-5  # the kernel accumulates in float32, whatever the cache holds
        assert torch.allclose(got, want.to(got.dtype), atol=tol), (heads, kv_heads, dim, (got - want).abs().max())
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    print("ok")
''')


def test_tree_attention_kernel_matches_pytorch_attention_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]



@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_packed_verification_on_cuda_uses_the_kernel_and_matches_sdpa(tiny_pair):
    import torch

    from radar.decoding.model import Transformer
    from radar.decoding.packed import packed_forward

    target = Transformer.from_pretrained(tiny_pair[0], device="cuda")
    ids = [torch.randint(3, 300, (1, n), device="cuda") for n in (5, 9)]
    calls = lambda: [dict(input_ids=x, position_ids=None, cache=target.new_cache(32), tree_mask=None,  # noqa: E731
                          last_only=False, capture=None) for x in ids]
    packed = packed_forward(target, calls())
    alone = [target(x, cache=c["cache"]) for x, c in zip(ids, calls())]
    for got, want in zip(packed, alone):
        assert torch.allclose(got, want, atol=1e-3)
