"""Decode attention over a cache of varying lengths: the PyTorch path against a float64 loop, and the Triton
split-KV kernel (run by Triton's CPU interpreter) against the PyTorch path."""

import importlib.util
import math

import pytest
import torch
from conftest import run_under_triton_interpreter

from train_mla.inference import decode_attention as da

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _float64_loop(q, k_cache, v_cache, lengths, scale):
    B, K, G, _ = q.shape
    out = torch.zeros(B, K, G, v_cache.shape[-1], dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for kh in range(K):
            for g in range(G):
                s = torch.tensor([float(q[b, kh, g].double() @ k_cache[b, t, kh].double()) * scale for t in range(n)])
                w = torch.exp(s - s.max())
                out[b, kh, g] = (w[:, None] * v_cache[b, :n, kh].double()).sum(0) / w.sum()
    return out


def _mla_case(seed=0, B=3, T=150, r=12, d_r=8, H=4):
    torch.manual_seed(seed)
    cache = torch.randn(B, T, 1, r + d_r)  # latent then RoPE key; the values are the latent columns
    return torch.randn(B, 1, H, r + d_r), cache, cache[..., :r], torch.tensor([T, 1, 77])[:B]


def _mla_even_case(seed=0, B=3, T=260, r=16, d_r=16, H=4):
    """Power-of-2 widths (the kernel's unmasked loads) and lengths on and off whole 128-token tiles."""
    torch.manual_seed(seed)
    cache = torch.randn(B, T, 1, r + d_r)
    return torch.randn(B, 1, H, r + d_r), cache, cache[..., :r], torch.tensor([256, 128, 77])[:B]


def _mla_wide_case(seed=0, B=3, T=90, r=300, d_r=20, H=4):
    """A latent row wider than triton_decode.WIDE_ROW (512 + 32 columns as loaded): TILE["mla_wide"]."""
    return _mla_case(seed, B, T, r, d_r, H)


def _gqa_case(seed=0, B=3, T=150, K=2, G=3, d=16):
    torch.manual_seed(seed)
    return torch.randn(B, K, G, d), torch.randn(B, T, K, d), torch.randn(B, T, K, d), torch.tensor([150, 1, 77])[:B]


@pytest.mark.parametrize("case", [_mla_case, _mla_even_case, _mla_wide_case, _gqa_case])
def test_reference_equals_float64_loop_and_ignores_positions_past_the_length(case):
    q, k, v, lengths = case()
    scale = 1 / math.sqrt(q.shape[-1])
    out = da.decode_attention(q, k, v, lengths, scale, backend="torch")
    torch.testing.assert_close(out.double(), _float64_loop(q, k, v, lengths, scale), atol=1e-5, rtol=1e-5)
    k2 = k.clone()
    k2[2, 77:] = 1e4  # garbage beyond sequence 2's length must not change its output
    out2 = da.decode_attention(
        q, k2, v if v.data_ptr() != k.data_ptr() else k2[..., : v.shape[-1]], lengths, scale, backend="torch"
    )
    torch.testing.assert_close(out2[2], out[2])


_KERNEL_CHECK = """
import sys, torch
sys.path[:0] = [{repo!r}, *{tests!r}]
from test_decode_attention import _gqa_case, _mla_case, _mla_even_case, _mla_wide_case
from train_mla.inference import decode_attention as da
from train_mla.inference import triton_decode as tk
# the tile entry per cache: DeepSeek's 512 + 64 and the wide case take the wide one, the recipes' widths the other
assert [tk.tile_layout(True, r, d_r) for r, d_r in ((512, 64), (300, 20), (256, 64), (64, 32), (16, 32))] == [
    "mla_wide", "mla_wide", "mla", "mla", "mla"] and tk.tile_layout(False, 512, 64) == "gqa"  # fmt: skip
worst = 0.0
formulations = [dict(transposed=t, fused_merge=f, balanced=False) for t in (False, True) for f in (False, True)]
formulations += [dict(transposed=t, fused_merge=True, balanced=True) for t in (False, True)]
formulations += [dict(transposed=False, fused_merge=True, balanced=True, block_t=16)]  # rows of up to 10 pieces
# whole tiles of the MLA cache by tensor descriptors (the interpreter runs them as the copy engine would)
formulations += [dict(transposed=False, fused_merge=False, balanced=False, block_t=128, tma=True)]
for t, bt in ((False, 16), (True, 128)):
    formulations += [dict(transposed=t, fused_merge=True, balanced=True, block_t=bt, tma=True)]
# MLA's 4 query heads in 2 groups of 2, each group in programs of its own (as for DeepSeek's 128 heads)
formulations += [dict(transposed=False, fused_merge=f, balanced=b, block_t=16, tma=b, heads_per_program=2)
                 for f, b in ((False, False), (True, True))]  # fmt: skip
# a cap on registers (a launch option; last, as every formulation keeps what the ones before it set)
formulations += [dict(transposed=True, fused_merge=True, balanced=True, block_t=16, tma=True, heads_per_program=None,
                      maxnreg=128)]  # fmt: skip
for form in formulations:  # every formulation; balanced: num_splits x rows programs share all tiles
    for layout in tk.TILE:
        tk.TILE[layout].update(form)
    fused_merge = form["fused_merge"]
    for case in (_mla_case, _mla_even_case, _mla_wide_case, _gqa_case):
        for splits in (1, 2, 3, 7, 19):  # 19: a merge of many partials
            q, k, v, lengths = case()
            if form.get("tma") and case is not _gqa_case:  # the copy-engine path is taken, not a fallback
                assert tk.tma_descriptors(k, v.shape[-1], k.shape[-1] - v.shape[-1], (16, 16, 16)) is not None
            ref = da.decode_attention(q, k, v, lengths, 0.3, backend="torch")
            out = da.decode_attention(q, k, v, lengths, 0.3, num_splits=splits, backend="triton")
            assert out.shape == ref.shape
            worst = max(worst, float((out - ref).abs().max()))
            if fused_merge and splits > 1:  # the merging programs put every counter back to 0 for the next call
                assert int(tk.split_counters(q.device, 1).abs().sum()) == 0
from conftest import tiny_llama
from train_mla.training.arguments import MLAArguments
from train_mla.inference.engine import Engine
from train_mla.conversion.gqa_to_mla import upcycle
src = tiny_llama()
mla = upcycle(src, MLAArguments(q_lora_rank=24, kv_lora_rank=12, qk_rope_head_dim=8), log=lambda *_: None).eval()
prompts = [[5, 9, 14, 3, 77], [8] * 11]
for model in (src, mla):  # the engine with the kernel generates what it generates with the PyTorch path
    fast = Engine(model, 2, 40)
    assert fast.backend == "triton", fast.backend
    assert fast.generate(prompts, 8) == Engine(model, 2, 40, attention_backend="torch").generate(prompts, 8)
print("max abs difference", worst)
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_matches_reference_and_drives_the_engine_under_the_interpreter():
    # TRITON_INTERPRET must be set before triton is first imported, hence a fresh process
    out = run_under_triton_interpreter(_KERNEL_CHECK)
    assert float(out.split()[-1]) < 1e-5, out


def test_unknown_backend_is_an_error():
    q, k, v, lengths = _gqa_case()
    with pytest.raises(ValueError, match="backend"):
        da.decode_attention(q, k, v, lengths, 0.3, backend="cuda")


def _mixed_lengths(B, T, device):
    return torch.tensor([T, 1, 77, T // 2 + 3][:B] + [T - 5 * i for i in range(max(0, B - 4))], device=device)


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize(
    "latent,rope,heads",
    [(64, 32, 32), (32, 16, 9), (80, 16, 9), (512, 64, 16), (512, 64, 128)],  # the recipes' widths, DeepSeek's
)
@pytest.mark.parametrize("batch", [1, 4, 37])
def test_triton_kernel_on_the_gpu_matches_the_float32_reference(latent, rope, heads, batch):
    """The kernel with TILE's tiles as they are (the interpreter test sets its own): compiles within the card's
    shared memory at every width and agrees with the float32 reference over mixed lengths in a bf16 cache."""
    torch.manual_seed(0)
    dev, T = torch.device("cuda"), 1100
    cache = torch.randn(batch, T, 1, latent + rope, device=dev, dtype=torch.bfloat16)
    q = torch.randn(batch, 1, heads, latent + rope, device=dev, dtype=torch.bfloat16)
    lengths = _mixed_lengths(batch, T, dev)
    scale = 1 / math.sqrt(latent + rope)
    ref = da.decode_attention(q.float(), cache.float(), cache[..., :latent].float(), lengths, scale, backend="torch")
    out = da.decode_attention(q, cache, cache[..., :latent], lengths, scale, backend="triton")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
