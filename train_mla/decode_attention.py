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

import math
import os

import torch


def decode_attention_reference(q, k_cache, v_cache, lengths, scale):
    """q [B, K, G, dk], k_cache [B, T, K, dk], v_cache [B, T, K, dv], lengths [B] -> [B, K, G, dv]."""
    T = int(lengths.max())
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 caches are attended in fp32, fp64 stays fp64
    k, v = k_cache[:, :T].to(acc), v_cache[:, :T].to(acc)  # [B, T, K, dk], [B, T, K, dv]
    scores = torch.einsum("bkgd,btkd->bkgt", q.to(acc), k) * scale  # [B, K, G, T]
    valid = torch.arange(T, device=q.device)[None, :] < lengths[:, None]  # [B, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bkgt,btkv->bkgv", scores.softmax(-1), v).to(q.dtype)


_KERNEL = None


def _build_kernel():
    """Compiled on first use, so TRITON_INTERPRET=1 set by a test before that use takes effect."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kv_decode(Q, Kc, Vc, Lens, Acc, Max, Sum,
                        sq_b, sq_k, sq_g, sk_b, sk_t, sk_k, sv_b, sv_t, sv_k,
                        G, DK, DV, num_splits, scale,
                        BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
        b, kh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_kh, n_s = tl.num_programs(1), tl.num_programs(2)
        length = tl.load(Lens + b).to(tl.int32)
        chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T  # tokens per split, whole tiles
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        g, dk, dv, t = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_T)
        b64 = b.to(tl.int64)
        q = tl.load(Q + b64 * sq_b + kh * sq_k + g[:, None] * sq_g + dk[None, :],
                    mask=(g[:, None] < G) & (dk[None, :] < DK), other=0.0)  # [BLOCK_G, BLOCK_DK]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
        l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - max)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)  # running sum of exp(score - max) * v
        for t0 in range(start, end, BLOCK_T):
            tt = (t0 + t).to(tl.int64)
            live = tt < end
            k = tl.load(Kc + b64 * sk_b + kh * sk_k + tt[:, None] * sk_t + dk[None, :],
                        mask=live[:, None] & (dk[None, :] < DK), other=0.0)  # [BLOCK_T, BLOCK_DK]
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(live[None, :], qk * scale, float("-inf"))  # [BLOCK_G, BLOCK_T]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
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


def decode_attention_triton(q, k_cache, v_cache, lengths, scale, num_splits: int):
    """Split-KV kernel; the merge of the splits is plain PyTorch (tiny tensors)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    B, K, G, DK = q.shape
    DV = v_cache.shape[-1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention_triton needs a contiguous last dimension in q, k_cache and v_cache.")
    BG, BDK, BDV = _next_pow2(G), _next_pow2(DK), _next_pow2(DV)
    acc = torch.empty(B, K, num_splits, BG, BDV, device=q.device, dtype=torch.float32)
    mx = torch.empty(B, K, num_splits, BG, device=q.device, dtype=torch.float32)
    sm = torch.empty_like(mx)
    _KERNEL[(B, K, num_splits)](
        q, k_cache, v_cache, lengths, acc, mx, sm,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        G, DK, DV, num_splits, scale,
        BLOCK_G=BG, BLOCK_DK=BDK, BLOCK_DV=BDV, BLOCK_T=64 if BDK <= 128 else 32, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2)
    weight = torch.exp(mx - mx.amax(2, keepdim=True))  # [B, K, S, BG]; empty splits have max -inf -> weight 0
    out = (acc * weight[..., None]).sum(2) / (sm * weight).sum(2)[..., None]  # [B, K, BG, BDV]
    return out[:, :, :G, :DV].to(q.dtype)


def default_num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Enough (sequence, head, split) programs to fill the GPU about twice."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(64, math.ceil(2 * sms / (batch * kv_heads))))


def use_triton(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def decode_attention(q, k_cache, v_cache, lengths, scale, num_splits: int | None = None, backend: str = "auto"):
    """q [B, K, G, dk], caches [B, T, K, d], lengths [B] (int) -> [B, K, G, dv]; backend auto | triton | torch."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"decode attention backend must be auto, triton or torch, not {backend!r}")
    if backend == "torch" or (backend == "auto" and not use_triton(q.device)):
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale)
    splits = num_splits or default_num_splits(q.shape[0], q.shape[1], q.device)
    return decode_attention_triton(q, k_cache, v_cache, lengths, scale, splits)
