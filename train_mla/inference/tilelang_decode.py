"""TileLang kernels of MLA decode attention over the latent cache: one new token per sequence, all query heads
attending to the cached rows [c_kv | k_pe] (the values are the first `latent` columns of the same rows).

The Triton kernels (triton_decode.py) are the portable path and the reference the CPU tests run; this is the Hopper
path of the GPU extra (`pip install -e ".[tilelang]"`). TileLang compiles `split_program` for sm_90 into a
warp-specialised kernel: one producer warpgroup streams the cache tiles into shared memory by the copy engine (TMA)
into a ring of `num_stages` buffers, the consumer warpgroup computes scores, online softmax and values on the tensor
cores as each tile lands. Work is split FlashDecoding's way: program (group, split, sequence) takes one group of
`block_h` query heads and one contiguous share of the sequence's tiles; `combine_program` then merges the splits by
their log-sum-exp. A share's last tile may reach past the sequence's length: those tokens' scores are masked, and
their rows must hold finite numbers (0 x NaN is NaN in the values' product), as the engine's zero-initialised cache
does (the PyTorch reference on a GPU, which reads the whole cache, needs the same).

Shapes: q [B, H, latent + rope], cache [B, T, latent + rope] (bf16 or fp16), lengths [B] int32 (each >= 1);
out [B, H, latent]. Batch and cache length are symbolic: one compiled kernel serves every B and T.
"""

import functools
import math

import torch

# Tiles of the kernel, per row width as in triton_decode: query heads per program, cache tokens per tile, ring
# buffers, consumer threads (one more warpgroup produces). The compiler gives each program 240 registers per consumer
# thread, so one program runs per multiprocessor and the ring's depth is what keeps bytes in flight (here 4 x 24 KB).
# 64 heads per program even for 32 heads (rows of zeros): a warpgroup's wgmma gives each warp whole rows of the scores,
# so the softmax's row max and sum stay within warps; at 32 rows (mma.sync) two warps share each row and every tile
# pays two cross-warp reductions through shared memory. "mla_wide" is for rows wider than WIDE_ROW (DeepSeek's
# 512 + 64), where two consumer warpgroups share the output. Not yet measured: benchmarks/decode_tilelang.py chooses on
# the card (docs/benchmarks.md).
TILE = {
    "mla": {"block_h": 64, "block_n": 128, "num_stages": 4, "threads": 128},
    "mla_wide": {"block_h": 64, "block_n": 32, "num_stages": 2, "threads": 256},
    "mla_wide_few_heads": {"block_h": 16, "block_n": 32, "num_stages": 4, "threads": 128},
}
WIDE_ROW = 320
SPLIT_COST_TILES = 2  # a split's fixed cost (query load, prologue, its share of the merge) in cache tiles


def supported(latent: int, rope: int) -> bool:
    """Widths the kernel's tensor-core tiles take: the latent a multiple of 16 (the products' K and, split over two
    warps, N in multiples of 8), the RoPE key of 8; every recipe's (16-512 + 8-64) is."""
    return latent > 0 and latent % 16 == 0 and rope > 0 and rope % 8 == 0


def tile_for(heads: int, width: int) -> dict:
    """TILE's entry for a cache row of `width` values read by `heads` query heads (16 or fewer: a group of 16)."""
    if width <= WIDE_ROW:
        return dict(TILE["mla"])
    return dict(TILE["mla_wide_few_heads" if heads <= 16 else "mla_wide"])


def available() -> bool:
    """TileLang installed and a CUDA GPU of compute capability 9.0 (Hopper) or newer to run it on."""
    try:
        import tilelang  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9


def split_program(heads, latent, rope, num_splits, block_h, block_n, num_stages, threads, dtype="bfloat16"):
    """The TileLang program of the split pass: writes each split's normalised output and log2-sum-exp."""
    import tilelang.language as T

    acc = "float32"
    batch, seq = T.dynamic("batch, seq")
    width = latent + rope
    groups = math.ceil(heads / block_h)

    @T.prim_func
    def split_pass(
        Q: T.Tensor((batch, heads, width), dtype),
        KV: T.Tensor((batch, seq, width), dtype),
        Lengths: T.Tensor((batch,), "int32"),
        scale_log2: T.float32,
        Part: T.Tensor((batch, num_splits, heads, latent), acc),
        Lse: T.Tensor((batch, num_splits, heads), acc),
    ):
        with T.Kernel(groups, num_splits, batch, threads=threads) as (g, s, b):
            q_s = T.alloc_shared((block_h, latent), dtype)  # [heads of the group, latent]
            qr_s = T.alloc_shared((block_h, rope), dtype)  # [heads, rope]
            kv_s = T.alloc_shared((block_n, latent), dtype)  # [tokens, latent]: keys' first part and the values
            kr_s = T.alloc_shared((block_n, rope), dtype)  # [tokens, rope]
            p_s = T.alloc_shared((block_h, block_n), dtype)  # softmax numerators for the values' product
            scores = T.alloc_fragment((block_h, block_n), acc)
            out = T.alloc_fragment((block_h, latent), acc)
            m = T.alloc_fragment((block_h,), acc)
            m_prev = T.alloc_fragment((block_h,), acc)
            alpha = T.alloc_fragment((block_h,), acc)
            row_sum = T.alloc_fragment((block_h,), acc)
            denom = T.alloc_fragment((block_h,), acc)

            length = Lengths[b]
            share = T.ceildiv(T.ceildiv(length, block_n), num_splits) * block_n  # whole tiles per split
            start = s * share
            end = T.min(start + share, length)

            for i, d in T.Parallel(block_h, latent):
                q_s[i, d] = T.if_then_else(g * block_h + i < heads, Q[b, g * block_h + i, d], 0)
            for i, d in T.Parallel(block_h, rope):
                qr_s[i, d] = T.if_then_else(g * block_h + i < heads, Q[b, g * block_h + i, latent + d], 0)
            T.fill(out, 0)
            T.fill(denom, 0)
            T.fill(m, -T.infinity(acc))
            for k in T.Pipelined(T.ceildiv(T.max(end - start, 0), block_n), num_stages=num_stages):
                t0 = start + k * block_n
                T.copy(KV[b, t0 : t0 + block_n, :latent], kv_s)  # [block_n, latent] by the copy engine
                T.copy(KV[b, t0 : t0 + block_n, latent:], kr_s)  # [block_n, rope]
                T.gemm(q_s, kv_s, scores, transpose_B=True, policy=T.GemmWarpPolicy.FullRow, clear_accum=True)
                T.gemm(qr_s, kr_s, scores, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)  # [block_h, block_n]
                for i, j in T.Parallel(block_h, block_n):
                    scores[i, j] = T.if_then_else(t0 + j < end, scores[i, j] * scale_log2, -T.infinity(acc))
                T.copy(m, m_prev)
                T.reduce_max(scores, m, dim=1, clear=False)
                for i in T.Parallel(block_h):
                    alpha[i] = T.exp2(m_prev[i] - m[i])  # rescales what came before the new maximum
                for i, j in T.Parallel(block_h, block_n):
                    scores[i, j] = T.exp2(scores[i, j] - m[i])
                T.reduce_sum(scores, row_sum, dim=1)
                for i in T.Parallel(block_h):
                    denom[i] = denom[i] * alpha[i] + row_sum[i]
                for i, d in T.Parallel(block_h, latent):
                    out[i, d] *= alpha[i]
                T.copy(scores, p_s)
                T.gemm(p_s, kv_s, out, policy=T.GemmWarpPolicy.FullRow)  # [block_h, latent]: the latent is the value
            for i, d in T.Parallel(block_h, latent):
                if g * block_h + i < heads:
                    Part[b, s, g * block_h + i, d] = T.if_then_else(denom[i] > 0, out[i, d] / denom[i], 0)
            for i in T.Parallel(block_h):
                if g * block_h + i < heads:
                    Lse[b, s, g * block_h + i] = T.if_then_else(denom[i] > 0, T.log2(denom[i]) + m[i], -T.infinity(acc))

    return split_pass


def combine_program(heads, latent, num_splits, block_h, threads=128, dtype="bfloat16"):
    """The TileLang program that merges the splits: out = sum_s 2^(lse_s - max) part_s / sum_s 2^(lse_s - max)."""
    import tilelang.language as T

    acc = "float32"
    batch = T.dynamic("batch")
    groups = math.ceil(heads / block_h)

    @T.prim_func
    def combine(
        Part: T.Tensor((batch, num_splits, heads, latent), acc),
        Lse: T.Tensor((batch, num_splits, heads), acc),
        Out: T.Tensor((batch, heads, latent), dtype),
    ):
        with T.Kernel(groups, batch, threads=threads) as (g, b):
            top = T.alloc_fragment((block_h,), acc)
            total = T.alloc_fragment((block_h,), acc)
            out = T.alloc_fragment((block_h, latent), acc)
            T.fill(top, -T.infinity(acc))
            T.fill(total, 0)
            T.fill(out, 0)
            for s in T.serial(num_splits):
                for i in T.Parallel(block_h):
                    if g * block_h + i < heads:
                        top[i] = T.max(top[i], Lse[b, s, g * block_h + i])
            for s in T.serial(num_splits):
                for i in T.Parallel(block_h):
                    if g * block_h + i < heads:
                        total[i] += T.exp2(Lse[b, s, g * block_h + i] - top[i])
                for i, d in T.Parallel(block_h, latent):
                    if g * block_h + i < heads:
                        out[i, d] += T.exp2(Lse[b, s, g * block_h + i] - top[i]) * Part[b, s, g * block_h + i, d]
            for i, d in T.Parallel(block_h, latent):
                if g * block_h + i < heads:
                    Out[b, g * block_h + i, d] = out[i, d] / total[i]

    return combine


@functools.lru_cache(maxsize=64)
def compiled(heads, latent, rope, num_splits, block_h, block_n, num_stages, threads, dtype):
    """Both passes compiled for this GPU on first use (by nvcc; TileLang also caches kernels on disk)."""
    import tilelang

    split = split_program(heads, latent, rope, num_splits, block_h, block_n, num_stages, threads, dtype)
    combine = combine_program(heads, latent, num_splits, block_h, dtype=dtype)
    return tilelang.compile(split, target="cuda"), tilelang.compile(combine, target="cuda")


def default_num_splits(programs: int, tiles: int, sms: int) -> int:
    """Splits per sequence for `programs` (sequence, head group) pairs over sequences of `tiles` cache tiles: the count
    whose waves of one program per multiprocessor finish first, by waves x (tiles per split + SPLIT_COST_TILES).
    64 sequences of 128 tiles on 132 multiprocessors: 2 splits (128 programs, one wave), not 3 (192: a second wave of
    60). Same time: fewer splits."""
    best, best_cost = 1, None
    for splits in range(1, min(tiles, 64) + 1):
        waves = math.ceil(programs * splits / sms)
        cost = waves * (math.ceil(tiles / splits) + SPLIT_COST_TILES)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


def plan(q, cache, latent, num_splits=None, tile=None, max_length=None):
    """The compiled (split pass, merge pass) and split count for q [B, H, latent + rope] over cache [B', T, latent +
    rope] (B' >= B), after checking both. tile: keys of TILE to override tile_for's; num_splits None:
    default_num_splits for max_length (the cache length T when None: a count fixed by shapes, as a CUDA graph needs)."""
    B, H, width = q.shape
    if cache.dim() != 3 or cache.shape[0] < B or cache.shape[-1] != width:
        raise ValueError(f"cache must be [B, T, {width}] for q {tuple(q.shape)}, got {tuple(cache.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16) or cache.dtype != q.dtype:
        raise ValueError(f"the TileLang kernel takes bf16 or fp16 q and cache alike, got {q.dtype}, {cache.dtype}")
    if not 0 < latent < width or not supported(latent, width - latent):
        raise ValueError(
            f"the TileLang kernel takes a latent of a multiple of 16 and a RoPE key of a multiple of 8 values, got "
            f"latent {latent} + RoPE {width - latent}"
        )
    if not cache[:B].is_contiguous():
        raise ValueError("the cache must be contiguous (rows of latent + rope values, one sequence after another)")
    tile = {**tile_for(H, width), **(tile or {})}
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        tiles = math.ceil((max_length or cache.shape[1]) / tile["block_n"])
        num_splits = default_num_splits(B * math.ceil(H / tile["block_h"]), tiles, sms)
    dtype = "bfloat16" if q.dtype == torch.bfloat16 else "float16"
    keys = (tile["block_h"], tile["block_n"], tile["num_stages"], tile["threads"])
    return (*compiled(H, latent, width - latent, num_splits, *keys, dtype), num_splits)


def decode_attention_tilelang(q, cache, lengths, scale, latent, num_splits=None, tile=None, max_length=None):
    """q [B, H, latent + rope], cache [B', T, latent + rope] (its first B sequences), lengths [B] (int, each >= 1)
    -> [B, H, latent]. The other arguments as `plan`'s."""
    split, combine, num_splits = plan(q, cache, latent, num_splits, tile, max_length)
    B, H, _ = q.shape
    part = torch.empty(B, num_splits, H, latent, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, num_splits, H, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, latent, device=q.device, dtype=q.dtype)
    split(q.contiguous(), cache[:B], lengths.to(torch.int32), scale * 1.4426950408889634, part, lse)
    combine(part, lse, out)
    return out
