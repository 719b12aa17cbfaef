"""Attention of one new token per sequence over a preallocated cache whose sequences have different lengths.

The same function serves both cache layouts of the inference engine:

* GQA (Llama): q [B, K, G, d] for K key/value heads with G query heads each; k_cache, v_cache [B, T, K, d].
* MLA absorbed ("MQA mode"): K = 1, G = all H heads, d = r + d_r; the values are the first r columns of the
  same latent cache, so v_cache is a view of k_cache and a tile loaded for the scores is reused for the values.

On CUDA (or under Triton's CPU interpreter) the Triton kernels of triton_decode.py read each cache entry once; elsewhere
the plain PyTorch reference below computes the same thing, and the tests check the kernels against it. On Hopper,
backend "tilelang" takes MLA's latent caches to the TileLang kernel of tilelang_decode.py (the GPU extra; GQA caches
stay with Triton). Only positions
t < lengths[b] of sequence b are attended to; every length is at least 1 (a decode
step always has the new token).
"""

import importlib.util
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


def triton_kernels():
    """The Triton kernels' module (train_mla/inference/triton_decode.py), imported on first use, so that
    TRITON_INTERPRET=1 set by a test before that takes effect."""
    from train_mla.inference import triton_decode

    return triton_decode


def use_triton(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


BACKENDS = ("auto", "triton", "tilelang", "torch")


def latent_prefix(k_cache, v_cache) -> bool:
    """MLA's absorbed layout: one key head, and the values are the first columns of the same cache rows."""
    return (
        k_cache.shape[2] == 1
        and v_cache.data_ptr() == k_cache.data_ptr()
        and v_cache.stride() == k_cache.stride()
        and v_cache.shape[-1] < k_cache.shape[-1]
    )


def decode_attention(q, k_cache, v_cache, lengths, scale, num_splits: int | None = None, backend: str = "auto"):
    """q [B, K, G, dk], caches [B, T, K, d], lengths [B] (int) -> [B, K, G, dv]; backend one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"decode attention backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch" or (backend == "auto" and not use_triton(q.device)):
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale)
    if backend == "tilelang" and latent_prefix(k_cache, v_cache):
        from train_mla.inference.tilelang_decode import decode_attention_tilelang

        out = decode_attention_tilelang(q[:, 0], k_cache[:, :, 0], lengths, scale, v_cache.shape[-1], num_splits)
        return out[:, None]  # [B, 1, H, latent]
    return triton_kernels().decode_attention_triton(q, k_cache, v_cache, lengths, scale, num_splits)


@torch.library.custom_op("train_mla::cached_decode_attention", mutates_args=())
def cached_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    lengths: torch.Tensor,
    scale: float,
    value_width: int,
    backend: str,
) -> torch.Tensor:
    """`decode_attention` over the first B = q.shape[0] slots of whole cache tensors, as one opaque operator, so that
    `torch.compile` of a decode layer neither traces into the kernel launch nor copies the cache around it.

    k_cache [slots, T, K, dk], or [slots, T, dk] for one key head; v_cache None: the values are the first
    `value_width` columns of k_cache (MLA's latent)."""
    k = k_cache[: q.shape[0]]
    if k.dim() == 3:
        k = k[:, :, None]  # [B, T, 1, dk]
    v = k[..., :value_width] if v_cache is None else v_cache[: q.shape[0]]
    return decode_attention(q, k, v, lengths, scale, backend=backend)


@cached_decode_attention.register_fake
def _(q, k_cache, v_cache, lengths, scale, value_width, backend):
    B, K, G, _ = q.shape
    return q.new_empty(B, K, G, value_width if v_cache is None else v_cache.shape[-1])
