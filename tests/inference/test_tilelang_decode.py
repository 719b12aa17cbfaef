"""The TileLang latent-cache decode kernel (train_mla/inference/tilelang_decode.py).

On any machine with TileLang (TILELANG=1 bash install.sh): both passes lower for Hopper (sm_90a) at the recipes'
widths and DeepSeek's into the kernel the design asks for: cache tiles by the copy engine (TMA) in a producer warpgroup
of its own, a consumer warpgroup on the tensor cores, shared memory within Hopper's 227 KB. On a Hopper GPU: the
kernel against the PyTorch float32 reference over mixed lengths, batch sizes, split counts and widths, with garbage
past the lengths, and under CUDA graph replays whose lengths change."""

import pytest
import torch

from train_mla.inference.decode_attention import decode_attention, decode_attention_reference

tilelang = pytest.importorskip("tilelang")

from train_mla.inference import tilelang_decode as tl  # noqa: E402

HOPPER_SHARED = 227 * 1024
SHAPES = {  # query heads, latent, RoPE key
    "1b": (32, 64, 32),
    "smollm2_25": (9, 80, 16),
    "smollm2_12": (9, 32, 16),
    "deepseek16": (16, 512, 64),
    "deepseek128": (128, 512, 64),
}


def lowered(program):
    from tilelang import tvm

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        artifact = tilelang.lower(program, target=target)
    (kernel,) = artifact.device_mod.functions.values()
    return artifact.kernel_source, int(kernel.attrs.get("dyn_shared_memory_buf", 0))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_split_pass_lowers_to_a_copy_engine_pipeline_for_hopper(shape):
    heads, latent, rope = SHAPES[shape]
    tile = tl.tile_for(heads, latent + rope)
    keys = ("block_h", "block_n", "num_stages", "threads")
    source, shared = lowered(tl.split_program(heads, latent, rope, 4, *(tile[k] for k in keys)))
    assert "tl::tma_load(" in source  # cache tiles by the copy engine
    assert "warpgroup_reg_dealloc" in source and "warpgroup_reg_alloc" in source  # producer / consumer warpgroups
    assert "mma" in source  # scores and values on the tensor cores
    assert f"__launch_bounds__({tile['threads'] + 128}, 1)" in source  # the consumers + one producer warpgroup
    ring = tile["num_stages"] * tile["block_n"] * (latent + rope) * 2  # bf16 cache tiles in flight
    assert ring <= shared <= HOPPER_SHARED


def test_combine_pass_lowers():
    source, _ = lowered(tl.combine_program(32, 64, 8, 32))
    assert "exp2" in source


def test_split_count_minimises_waves_times_split_length():
    assert tl.default_num_splits(64, 128, 132) == 2  # 128 programs in one wave, not 192 in two
    assert tl.default_num_splits(1, 16, 132) == 16  # one sequence of 16 tiles: one split per tile, no more
    assert tl.default_num_splits(16, 512, 132) == 8
    assert tl.default_num_splits(256, 128, 132) == 1  # already two full waves


gpu = pytest.mark.skipif(not tl.available(), reason="needs a Hopper GPU with TileLang")


def case(B, T, heads, latent, rope, lengths, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    cache = torch.randn(B, T, latent + rope, device="cuda", generator=g).to(torch.bfloat16)
    for b, n in enumerate(lengths):
        cache[b, n:] = 1e4  # finite garbage past the lengths must not reach the output
    q = torch.randn(B, heads, latent + rope, device="cuda", generator=g).to(torch.bfloat16)
    return q, cache, torch.tensor(lengths, device="cuda", dtype=torch.int32)


def reference(q, cache, lengths, scale, latent):
    """float32 attention over the bf16 inputs: [B, H, latent]."""
    k = cache.float()[:, :, None]
    return decode_attention_reference(q.float()[:, None], k, k[..., :latent], lengths, scale)[:, 0]


@gpu
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_matches_the_float32_reference_over_mixed_lengths(shape, num_splits):
    heads, latent, rope = SHAPES[shape]
    lengths = [1, 31, 32, 33, 64, 65, 1000, 4097]
    q, cache, lens = case(len(lengths), 4200, heads, latent, rope, lengths)
    scale = (latent + rope) ** -0.5
    out = tl.decode_attention_tilelang(q, cache, lens, scale, latent, num_splits)
    ref = reference(q, cache, lens, scale, latent)
    assert out.shape == (len(lengths), heads, latent) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("B", [1, 3, 64])
def test_batch_sizes_and_the_decode_attention_backend(B):
    heads, latent, rope = SHAPES["1b"]
    lengths = [(37 * b) % 2000 + 1 for b in range(B)]
    q, cache, lens = case(B, 2048, heads, latent, rope, lengths, seed=B)
    scale = (latent + rope) ** -0.5
    k = cache[:, :, None]
    out = decode_attention(q[:, None], k, k[..., :latent], lens, scale, backend="tilelang")  # [B, 1, H, latent]
    triton = decode_attention(q[:, None], k, k[..., :latent], lens, scale, backend="triton")
    ref = reference(q, cache, lens, scale, latent)
    torch.testing.assert_close(out[:, 0].float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), triton.float(), atol=2e-2, rtol=2e-2)


@gpu
def test_cuda_graph_replays_follow_the_lengths():
    heads, latent, rope = SHAPES["1b"]
    B, T = 4, 1024
    q, cache, lens = case(B, T, heads, latent, rope, [T] * B)
    scale = (latent + rope) ** -0.5
    lens.copy_(torch.tensor([5, 100, 700, 64], device="cuda"))
    tl.decode_attention_tilelang(q, cache, lens, scale, latent)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tl.decode_attention_tilelang(q, cache, lens, scale, latent)
    for lengths in ([5, 100, 700, 64], [1, 1024, 65, 333]):
        lens.copy_(torch.tensor(lengths, device="cuda"))
        graph.replay()
        torch.testing.assert_close(out.float(), reference(q, cache, lens, scale, latent), atol=2e-2, rtol=2e-2)


def test_bad_input_is_refused_before_any_kernel():
    q = torch.zeros(2, 4, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cache must be"):
        tl.decode_attention_tilelang(q, torch.zeros(2, 8, 64, dtype=torch.bfloat16), torch.ones(2), 1.0, 64)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        tl.decode_attention_tilelang(q.float(), torch.zeros(2, 8, 96), torch.ones(2), 1.0, 64)
    with pytest.raises(ValueError, match="latent 96 \\+ RoPE 0"):
        tl.decode_attention_tilelang(q, torch.zeros(2, 8, 96, dtype=torch.bfloat16), torch.ones(2), 1.0, 96)
    with pytest.raises(ValueError, match="latent 72 \\+ RoPE 24"):  # 72 is no multiple of 16
        tl.decode_attention_tilelang(q, torch.zeros(2, 8, 96, dtype=torch.bfloat16), torch.ones(2), 1.0, 72)


@gpu
@pytest.mark.parametrize("compile", [False, True])
def test_the_engines_decode_logits_through_the_tilelang_kernel_match_the_triton_kernels(compile):
    """A decode step of a tiny MLA model (latent 16 + RoPE 8) in the engine's CUDA graphs (and compiled layers) with
    the TileLang kernel gives the logits the Triton kernel gives, up to bf16 rounding (a wrong kernel is off by the
    logits' own scale), over a mixed-length batch."""
    from conftest import tiny_llama

    from train_mla.conversion.gqa_to_mla import upcycle
    from train_mla.inference.engine import Engine
    from train_mla.training.arguments import MLAArguments

    args = MLAArguments(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, rope_init="keep_pairs")
    mla = upcycle(tiny_llama(), args, log=lambda *_: None).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 30, 1, 17)]
    positions = torch.tensor([len(p) for p in prompts], device="cuda")
    logits = {}
    for backend in ("triton", "tilelang"):
        engine = Engine(mla, 4, 64, compile=compile, attention_backend=backend)
        tokens = engine.prefill(prompts, list(range(4))).argmax(-1)
        logits[backend] = engine.decode(tokens, positions).float().clone()
    scale = logits["triton"].abs().max()
    assert (logits["tilelang"] - logits["triton"]).abs().max() <= 0.05 * scale
