"""The Triton matrix-vector product (train_mla/inference/gemv.py, run by Triton's CPU interpreter) against a float64
product, over shapes that are not multiples of its tiles, several rows, shares of K and a bias."""

import importlib.util

import pytest
from conftest import run_under_triton_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None

_CHECK = """
import sys, torch
sys.path[:0] = [{repo!r}, *{tests!r}]
from train_mla.inference.gemv import default_split_k, gemv
torch.manual_seed(0)
worst = 0.0
for M, N, K in ((1, 37, 300), (3, 16, 1024), (1, 200, 77)):
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    ref = x.double() @ w.double().T
    for tile in (dict(block_n=8, block_k=64, split_k=1), dict(block_n=4, block_k=32, split_k=3),
                 dict(block_n=16, block_k=128, split_k=None), dict(block_n=8, block_k=16, split_k=64)):
        worst = max(worst, float((gemv(x, w, tile=tile).double() - ref).abs().max() / ref.abs().max()))
    worst = max(worst, float((gemv(x, w, b, tile=dict(block_n=8, block_k=64)).double() - ref - b.double()).abs().max()))
    assert gemv(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16
x, w = torch.randn(1, 2048), torch.randn(2048, 8192)[:, :2048]  # a view whose rows are not packed
assert torch.allclose(gemv(x, w), x @ w.T, atol=1e-3)
try:
    gemv(x, torch.randn(2048, 2048).T)
    raise AssertionError("a weight with strided rows must be refused")
except ValueError as e:
    assert "contiguous" in str(e)
# a down projection's few rows get shares of K; a wide layer gets none
assert default_split_k(2048, 8192, 8, 512, 132) == 2 and default_split_k(16384, 2048, 8, 512, 132) == 1
print("max relative difference", worst)
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gemv_matches_a_float64_product_under_the_interpreter():
    out = run_under_triton_interpreter(_CHECK)
    assert float(out.split()[-1]) < 1e-5, out
