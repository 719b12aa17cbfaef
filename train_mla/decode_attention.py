"""Attention of one new token per sequence over a preallocated cache whose sequences have different lengths.

The same function serves both cache layouts of the inference engine:

* GQA (Llama): q [B, K, G, d] for K key/value heads with G query heads each; k_cache, v_cache [B, T, K, d].
* MLA absorbed ("MQA mode"): K = 1, G = all H heads, d = r + d_r; the values are the first r columns of the
  same latent cache, so v_cache is a view of k_cache and a tile loaded for the scores is reused for the values.

On CUDA a split-KV Triton kernel (flash-decoding: every (sequence, key head, split) is one program, each split
keeps a running max and sum, and the splits are merged at the end) reads each cache entry once. Elsewhere the
plain PyTorch reference below computes the same thing; tests check the kernel against it under Triton's
interpreter on CPU. Only positions t < lengths[b] of sequence b are attended to.
"""

import importlib.util
import math
import os

import torch


def decode_attention_reference(q, k_cache, v_cache, lengths, scale):
    """q [B, K, G, dk], k_cache [B, T, K, dk], v_cache [B, T, K, dv], lengths [B] -> [B, K, G, dv].

    On CPU only the longest sequence's prefix is read; on a GPU the whole cache, so that no host sync breaks a
    CUDA graph."""
    T = k_cache.shape[1] if q.is_cuda else int(lengths.max())
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 caches are attended in fp32, fp64 stays fp64
    k, v = k_cache[:, :T].to(acc), v_cache[:, :T].to(acc)  # [B, T, K, dk], [B, T, K, dv]
    scores = torch.einsum("bkgd,btkd->bkgt", q.to(acc), k) * scale  # [B, K, G, T]
    valid = torch.arange(T, device=q.device)[None, :] < lengths[:, None]  # [B, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bkgt,btkv->bkgv", scores.softmax(-1), v).to(q.dtype)


_KERNEL = None


def kernel():
    """The Triton kernel, built on first use (so that TRITON_INTERPRET=1 set by a test before that takes effect)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kv_decode(Q, Kc, Vc, Lens, Acc, Max, Sum,
                        sq_b, sq_k, sq_g, sk_b, sk_t, sk_k, sv_b, sv_t, sv_k,
                        G, DA, DB, DV, num_splits, scale,
                        BLOCK_G: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_T: tl.constexpr, HAS_B: tl.constexpr, V_IS_KA: tl.constexpr, IEEE: tl.constexpr):
        # key columns = part A [0, DA) + part B [DA, DA + DB). MLA: A = latent (also the values), B = RoPE key.
        b, kh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_kh, n_s = tl.num_programs(1), tl.num_programs(2)
        length = tl.load(Lens + b).to(tl.int32)
        chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T  # tokens per split, whole tiles
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        g, t = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_T)
        da, db, dv = tl.arange(0, BLOCK_DA), tl.arange(0, BLOCK_DB), tl.arange(0, BLOCK_DV)
        b64 = b.to(tl.int64)
        q_row = Q + b64 * sq_b + kh * sq_k + g[:, None] * sq_g
        qa = tl.load(q_row + da[None, :], mask=(g[:, None] < G) & (da[None, :] < DA), other=0.0)  # [BLOCK_G, BLOCK_DA]
        qb = tl.load(q_row + DA + db[None, :], mask=(g[:, None] < G) & (db[None, :] < DB), other=0.0)  # [BLOCK_G, BLOCK_DB]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
        l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - max)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)  # running sum of exp(score - max) * v
        for t0 in range(start, end, BLOCK_T):
            tt = (t0 + t).to(tl.int64)
            live = tt < end
            k_row = Kc + b64 * sk_b + kh * sk_k + tt[:, None] * sk_t
            ka = tl.load(k_row + da[None, :], mask=live[:, None] & (da[None, :] < DA), other=0.0)  # [BLOCK_T, BLOCK_DA]
            if IEEE:
                qk = tl.dot(qa, tl.trans(ka), input_precision="ieee")
            else:
                qk = tl.dot(qa, tl.trans(ka))
            if HAS_B:
                kb = tl.load(k_row + DA + db[None, :], mask=live[:, None] & (db[None, :] < DB), other=0.0)
                if IEEE:
                    qk += tl.dot(qb, tl.trans(kb), input_precision="ieee")
                else:
                    qk += tl.dot(qb, tl.trans(kb))
            qk = tl.where(live[None, :], qk * scale, float("-inf")).to(tl.float32)  # [BLOCK_G, BLOCK_T]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            if V_IS_KA:
                v = ka  # MLA: the values are the latent columns just loaded for the scores
            else:
                v = tl.load(Vc + b64 * sv_b + kh * sv_k + tt[:, None] * sv_t + dv[None, :],
                            mask=live[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_T, BLOCK_DV]
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        row = ((b64 * n_kh + kh) * n_s + s) * BLOCK_G + g  # partials laid out [B, K, S, BLOCK_G, ...]
        tl.store(Max + row, m_i)
        tl.store(Sum + row, l_i)
        tl.store(Acc + row[:, None] * BLOCK_DV + dv[None, :], acc)

    return split_kv_decode


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


# tile sizes per cache layout, chosen by the sweep of benchmarks/decode_kernel_sweep.py (docs/benchmarks.md)
TILE = {"mla": {"block_t": 128, "num_warps": 4, "num_stages": 3}, "gqa": {"block_t": 64, "num_warps": 4, "num_stages": 3}}


def decode_attention_triton(q, k_cache, v_cache, lengths, scale, num_splits: int):
    """Split-KV kernel; the merge of the splits is plain PyTorch (tiny tensors).

    When v_cache is the first columns of k_cache (MLA's latent), each tile is loaded once for scores and values."""
    B, K, G, DK = q.shape
    DV = v_cache.shape[-1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention_triton needs a contiguous last dimension in q, k_cache and v_cache.")
    v_is_prefix = v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and DV <= DK
    DA = DV if v_is_prefix else DK
    DB = DK - DA
    BG, BDA, BDB = _next_pow2(G), _next_pow2(DA), _next_pow2(max(DB, 1))
    BDV = BDA if v_is_prefix else _next_pow2(DV)
    tile = TILE["mla" if v_is_prefix else "gqa"]
    acc = torch.empty(B, K, num_splits, BG, BDV, device=q.device, dtype=torch.float32)
    mx = torch.empty(B, K, num_splits, BG, device=q.device, dtype=torch.float32)
    sm = torch.empty_like(mx)
    kernel()[(B, K, num_splits)](
        q, k_cache, v_cache, lengths, acc, mx, sm,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        G, DA, DB, DV, num_splits, scale,
        BLOCK_G=BG, BLOCK_DA=BDA, BLOCK_DB=BDB, BLOCK_DV=BDV, BLOCK_T=tile["block_t"], HAS_B=DB > 0,
        V_IS_KA=v_is_prefix, IEEE=q.dtype == torch.float32, num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    weight = torch.exp(mx - mx.amax(2, keepdim=True))  # [B, K, S, BG]; empty splits have max -inf -> weight 0
    out = (acc * weight[..., None]).sum(2) / (sm * weight).sum(2)[..., None]  # [B, K, BG, BDV]
    return out[:, :, :G, :DV].to(q.dtype)


def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


PROGRAMS_PER_SM = 2  # with TILE above: chosen by benchmarks/decode_kernel_sweep.py


def default_num_splits(batch: int, kv_heads: int, sms: int) -> int:
    """Enough (sequence, key head, split) programs to give every multiprocessor PROGRAMS_PER_SM of them."""
    return max(1, min(64, math.ceil(PROGRAMS_PER_SM * sms / (batch * kv_heads))))


def use_triton(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


def decode_attention(q, k_cache, v_cache, lengths, scale, num_splits: int | None = None, backend: str = "auto"):
    """q [B, K, G, dk], caches [B, T, K, d], lengths [B] (int) -> [B, K, G, dv]; backend auto | triton | torch."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"decode attention backend must be auto, triton or torch, not {backend!r}")
    if backend == "torch" or (backend == "auto" and not use_triton(q.device)):
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale)
    splits = num_splits or default_num_splits(q.shape[0], q.shape[1], multiprocessors(q.device))
    return decode_attention_triton(q, k_cache, v_cache, lengths, scale, splits)
