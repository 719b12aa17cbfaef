"""The generation engine against transformers' own `generate` and full forward, on tiny MLA and Llama models."""

import pytest
import torch
from conftest import tiny_llama

from train_mla.conversion.gqa_to_mla import upcycle
from train_mla.inference import engine as engine_module
from train_mla.inference.engine import Engine
from train_mla.model.kv_cache_size import kv_cache_table
from train_mla.training.arguments import MLAArguments


def _mla(mla_layers=None, decode_path="absorbed", rope_init="keep_pairs", norm=False, q_lora_rank=24):
    src = tiny_llama()
    args = MLAArguments(
        q_lora_rank=q_lora_rank,
        kv_lora_rank=12,
        qk_rope_head_dim=8,
        rope_init=rope_init,
        mla_layers=mla_layers,
        mla_decode_path=decode_path,
        use_lora_layer_norm=norm,
    )
    return src.double(), upcycle(src, args, log=lambda *_: None).double().eval()


def _prompts(lengths=(5, 11, 1, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("which", ["llama", "mla", "mla_hybrid_naive", "mla_xecomla_norm"])
def test_greedy_equals_transformers_generate_for_each_prompt_of_a_mixed_batch(which):
    src, mla = _mla(
        mla_layers=[0, 2] if "hybrid" in which else None,
        decode_path="naive" if "naive" in which else "absorbed",
        rope_init="xecomla" if "xecomla" in which else "keep_pairs",
        norm="norm" in which,
    )
    model = src if which == "llama" else mla
    prompts = _prompts()
    batched = Engine(model, max_batch_size=4, max_seq_len=40).generate(prompts, max_new_tokens=14)
    for prompt, got in zip(prompts, batched):
        assert got == _hf_greedy(model, prompt, 14)
    alone = Engine(model, max_batch_size=1, max_seq_len=40)
    assert [alone.generate([p], max_new_tokens=14)[0] for p in prompts] == batched


@pytest.mark.parametrize(
    "case", ["mla", "mla_eager", "mla_unfolded", "mla_full_q", "mla_full_q_unfolded", "llama_bias"]
)
def test_prefill_and_absorbed_decode_logits_equal_the_full_forward(case, monkeypatch):
    """Every path of the decode layer: the absorption folded into the weights or applied per step (FOLD_LIMIT 0),
    a low-rank or a full-rank query, and merged projections with biases (a Llama with attention and MLP biases)."""
    if case == "llama_bias":
        model = tiny_llama(attention_bias=True, mlp_bias=True).double()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.3)
    else:
        model = _mla(q_lora_rank=None if "full_q" in case else 24)[1]
    if "unfolded" in case:
        monkeypatch.setattr(engine_module, "FOLD_LIMIT", 0.0)
    attn = "eager" if "eager" in case else "sdpa"
    model.config._attn_implementation = attn
    prompts = _prompts((6, 3))
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    if case.startswith("mla"):
        folded = engine.caches[0].w_uk is None and engine.caches[0].w_o is not None
        assert folded == ("unfolded" not in case)
    tol = 1e-9 if attn == "sdpa" else 1e-5  # transformers' eager attention takes its softmax in float32
    with torch.no_grad():
        logits = engine.prefill(prompts, [0, 1])
        seqs, positions = [list(p) for p in prompts], torch.tensor([len(p) for p in prompts])
        for _ in range(5):
            for b in range(2):
                full = model(torch.tensor([seqs[b]])).logits[0, -1]  # independent reference: no cache at all
                torch.testing.assert_close(logits[b].double(), full, atol=tol, rtol=tol)
            tokens = logits.argmax(-1)
            for b in range(2):
                seqs[b].append(int(tokens[b]))
            logits = engine.decode(tokens, positions)
            positions = positions + 1


class _PastKeyValuesAttention(torch.nn.Module):
    """A Llama attention that takes its cache as `past_key_values`, as transformers < 5.24 named it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = inner.q_proj, inner.k_proj, inner.v_proj, inner.o_proj
        self.config, self.head_dim, self.scaling = inner.config, inner.head_dim, inner.scaling

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        kwargs.pop("cache", None)
        return self.inner(hidden_states, position_embeddings, attention_mask, cache=past_key_values, **kwargs)


def test_prefill_fills_the_cache_of_an_attention_that_calls_it_past_key_values():
    model = tiny_llama().double()
    for layer in model.model.layers:
        layer.self_attn = _PastKeyValuesAttention(layer.self_attn)
    prompt = _prompts((7,))[0]
    engine = Engine(model, max_batch_size=1, max_seq_len=16)
    with torch.no_grad():
        token = engine.prefill([prompt], [0]).argmax(-1)
        logits = engine.decode(token, torch.tensor([len(prompt)]))
        full = model(torch.tensor([prompt + [int(token)]]), use_cache=False).logits[0, -1]
    torch.testing.assert_close(logits[0].double(), full, atol=1e-9, rtol=1e-9)


def test_merged_projections_are_the_models_own_weights():
    """Building an engine stores no second copy of the projections it merges, and leaves the model's outputs as
    they were."""
    _, model = _mla()
    ids = torch.tensor([_prompts((7,))[0]])
    with torch.no_grad():
        before = model(ids).logits
        engine = Engine(model, max_batch_size=1, max_seq_len=16)
        after = model(ids).logits
    assert torch.equal(before, after)
    layer, cache, mlp = model.model.layers[0], engine.caches[0], engine.mlps[0]
    assert layer.mlp.up_proj.weight.data_ptr() == mlp.weight[mlp.width :].data_ptr()
    kv_a = layer.self_attn.kv_a_proj_with_mqa.weight
    assert kv_a.data_ptr() == cache.w_in[-kv_a.shape[0] :].data_ptr()


def test_compiled_decode_layers_give_the_same_tokens():
    """torch.compile of the decode layer (the cache write inside the compiled graph, the attention an opaque
    operator) against the eager engine and transformers' generate."""
    src, mla = _mla(mla_layers=[0, 2])  # hybrid: both layer kinds compiled
    prompts = _prompts((5, 9))
    eager = Engine(mla, max_batch_size=2, max_seq_len=24).generate(prompts, max_new_tokens=8)
    compiled_engine = Engine(mla, max_batch_size=2, max_seq_len=24, compile=True)
    assert compiled_engine.generate(prompts, max_new_tokens=8) == eager
    assert eager == [_hf_greedy(mla, p, 8) for p in prompts]


@pytest.mark.parametrize("layers", [None, [1]])
def test_allocated_cache_bytes_equal_the_accounting(layers):
    src, mla = _mla(mla_layers=layers)
    for model in (src, mla):
        engine = Engine(model.float(), max_batch_size=3, max_seq_len=16, cache_dtype=torch.bfloat16)
        assert engine.cache_bytes_per_token() == kv_cache_table(src.config, model.config)["mla_bytes_per_token"]


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy_and_eos_stops():
    _, model = _mla()
    engine = Engine(model, max_batch_size=2, max_seq_len=40)
    prompts = _prompts((4, 9))
    greedy = engine.generate(prompts, 10)
    assert engine.generate(prompts, 10, temperature=0.7, top_p=1e-9, seed=3) == greedy
    a = engine.generate(prompts, 10, temperature=1.5, seed=3)
    assert a == engine.generate(prompts, 10, temperature=1.5, seed=3) and a != greedy
    eos = greedy[0][3]
    stopped = engine.generate(prompts, 10, eos_token_id=eos)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]


def test_bad_requests_are_clear_errors():
    _, model = _mla()
    engine = Engine(model, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len 16"):
        engine.generate([[5] * 10], max_new_tokens=7)
    with pytest.raises(ValueError, match="max_batch_size"):
        engine.generate(_prompts((2, 2, 2)), max_new_tokens=2)
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(model, max_batch_size=1, max_seq_len=8, cuda_graphs=True)
    if not torch.cuda.is_available():  # the TileLang kernel is Hopper's: refused before any cache is allocated
        with pytest.raises(ValueError, match="tilelang"):
            Engine(model, max_batch_size=1, max_seq_len=8, attention_backend="tilelang")


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_token_frequencies_follow_the_nucleus_distribution(top_p):
    """Both sampling paths (top_p = 1 without a sort, top_p < 1 through the sorted nucleus) against the distribution
    computed here independently: 20,000 draws per row, every frequency within 5 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 0.1, 0.2, 0.3, 3.0, -2.0]], dtype=torch.float64)
    probs = logits.softmax(-1)
    ranked, order = probs.sort(-1, descending=True)
    keep = ranked.cumsum(-1) - ranked <= top_p  # the smallest prefix whose mass reaches top_p
    want = torch.zeros_like(probs).scatter(-1, order, ranked * keep)
    want = want / want.sum(-1, keepdim=True)
    n, g = 20_000, torch.Generator().manual_seed(0)
    draws = torch.stack([Engine.sample(logits, 1.0, top_p, g) for _ in range(n)], 1)  # [2, n]
    freq = torch.stack([torch.bincount(d, minlength=6) for d in draws]).double() / n
    se = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)
    assert (freq[want == 0] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_the_copy_engine_tile_in_the_engine_gives_the_same_tokens_on_the_gpu(compile, monkeypatch):
    """The MLA kernel reading the cache by tensor descriptors (tma) inside the engine's CUDA graphs (and compiled
    layers) loads the same numbers as the pointer path, so the tokens must be identical; and the descriptors must
    have been built (a Hopper GPU), or the copy engine was never used."""
    from train_mla.inference import triton_decode as tk

    args = MLAArguments(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, rope_init="keep_pairs")
    mla = upcycle(tiny_llama(), args, log=lambda *_: None).to("cuda", torch.bfloat16).eval()
    prompts = _prompts((5, 30, 1, 17))
    pointer = Engine(mla, max_batch_size=4, max_seq_len=64, compile=compile).generate(prompts, max_new_tokens=24)
    built, descriptors = [], tk.tma_descriptors

    def recorded(*args):  # the descriptors the kernel asked for (None: it fell back to the pointer path)
        built.append(descriptors(*args))
        return built[-1]

    monkeypatch.setattr(tk, "tma_descriptors", recorded)
    tile = dict(block_t=128, num_warps=4, num_stages=3, programs_per_sm=2, tma=True)  # the confirmed H100 tile
    monkeypatch.setitem(tk.TILE, "mla", {**tk.TILE["mla"], **tile})
    engine = Engine(mla, max_batch_size=4, max_seq_len=64, compile=compile)
    assert engine.generate(prompts, max_new_tokens=24) == pointer
    if torch.cuda.get_device_capability()[0] >= 9:
        assert built and all(d is not None for d in built)
