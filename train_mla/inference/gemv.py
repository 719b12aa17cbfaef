"""A Triton matrix-vector product for the decode step at batch 1-4, where a linear layer reads its whole weight to
multiply a few rows: y [M, N] = x [M, K] @ W [N, K]^T, W in nn.Linear's layout (rows of K contiguous values).

Each program reduces BLOCK_N rows of W over its share of K (SPLIT_K shares: more programs for a weight with few rows,
e.g. a down projection [2048, 8192]); shares are added in float32 (atomic adds into a zeroed buffer). The products
accumulate in float32 whatever the inputs' precision, as cuBLAS's do. `benchmarks/gemv.py` measures it against cuBLAS
at the engine's shapes (on an H100: 0-12 % faster per weight, about 4 % of the batch-1 step); the engine does not call
it.

Import this module only when the kernel is needed: Triton reads TRITON_INTERPRET (the CPU interpreter the tests use)
when the kernel below is defined, at import.
"""

import torch
import triton
import triton.language as tl

from train_mla.inference.triton_decode import multiprocessors


@triton.jit
def gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    k_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_ok = cols < k_end
        x = tl.load(x_ptr + m * stride_xm + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    out = y_ptr + m * stride_ym + rows
    if SPLIT_K == 1:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(out, y, mask=row_ok)  # float32 buffer, zeroed by the caller


# rows per program, K per tile, shares of K (None: enough programs for the multiprocessors), warps, pipeline stages.
# The best tile for three of the 1B step's six weights on an H100 (the LM head, down, q_a | kv_a; the others' best
# tiles differ, and its time on them was not recorded then: benchmarks/gemv.py now keeps every tile's); split K won
# on none of them (docs/benchmarks.md, 2026-12-07)
GEMV_TILE = {"block_n": 4, "block_k": 512, "split_k": 1, "num_warps": 8, "num_stages": 3}


def default_split_k(n: int, k: int, block_n: int, block_k: int, multiprocessors: int) -> int:
    """Shares of K that give every multiprocessor about two programs, without shares shorter than two tiles."""
    programs = triton.cdiv(n, block_n)
    split = 1
    while programs * split < 2 * multiprocessors and k // (2 * split) >= 2 * block_k:
        split *= 2
    return split


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tile: dict | None = None):
    """x [M, K], weight [N, K] (last dimensions contiguous) -> [M, N] in x's dtype: F.linear(x, weight, bias)."""
    t = {**GEMV_TILE, **(tile or {})}
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"gemv needs x [M, K] and weight [N, K] with contiguous rows, got {x.shape}, {weight.shape}")
    split = t["split_k"] or default_split_k(N, K, t["block_n"], t["block_k"], multiprocessors(x.device))
    k_per_split = triton.cdiv(triton.cdiv(K, split), t["block_k"]) * t["block_k"]  # whole tiles per share
    split = triton.cdiv(K, k_per_split)
    y = (
        torch.zeros(M, N, device=x.device, dtype=torch.float32)
        if split > 1
        else torch.empty(M, N, device=x.device, dtype=x.dtype)
    )
    grid = (triton.cdiv(N, t["block_n"]), split, M)
    gemv_kernel[grid](
        x,
        weight,
        y,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        k_per_split,
        BLOCK_N=t["block_n"],
        BLOCK_K=t["block_k"],
        SPLIT_K=split,
        num_warps=t["num_warps"],
        num_stages=t["num_stages"],
    )
    y = y.to(x.dtype)
    return y if bias is None else y + bias
