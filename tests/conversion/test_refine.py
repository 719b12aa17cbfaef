"""Layer-wise refinement after the closed-form init (train_mla/conversion/refine.py)."""

import pytest
import torch
from conftest import tiny_with_calibration

from train_mla.conversion.calibration import attention_input_moments, calibration_token_blocks
from train_mla.conversion.gqa_to_mla import resolve_rope_freq_indices, upcycle
from train_mla.conversion.refine import refine_layer
from train_mla.training.arguments import MLAArguments


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_calibration(tmp_path_factory.mktemp("refine"), torch.float32)


def _args(root, **kw):
    base = dict(
        q_lora_rank=None,
        kv_lora_rank=6,
        qk_rope_head_dim=8,
        init_method="activation",
        shared_rope_key="pca",
        kv_balance=True,
        calibration_dataset=str(root / "calib.txt"),
        calibration_samples=4,
        calibration_seq_length=32,
    )
    return MLAArguments(**{**base, **kw})


def test_refinement_lowers_every_layers_output_error(tiny):
    src, tok, root = tiny
    model = upcycle(src, _args(root), log=lambda *_: None, tokenizer=tok)
    blocks = calibration_token_blocks(tok, str(root / "calib.txt"), 4, 32)
    moments, inputs = attention_input_moments(src, blocks, keep_inputs=True)
    assert set(inputs) == set(moments) == {0, 1, 2} and inputs[0].shape == (4, 32, 64)
    for i, layer in enumerate(model.model.layers):
        before, after = refine_layer(
            src.model.layers[i].self_attn,
            layer.self_attn,
            inputs[i],
            src.model.rotary_emb,
            steps=30,
            lr=3e-3,
            batch_size=2,
            seed=i,
        )
        assert before > 0.05 and after < 0.7 * before, (i, before, after)


def test_refined_upcycle_is_deterministic_and_leaves_the_source_unchanged(tiny):
    src, tok, root = tiny
    original = {k: v.clone() for k, v in src.state_dict().items()}
    a = upcycle(src, _args(root, refine_steps=10), log=lambda *_: None, tokenizer=tok)
    b = upcycle(src, _args(root, refine_steps=10), log=lambda *_: None, tokenizer=tok)
    plain = upcycle(src, _args(root), log=lambda *_: None, tokenizer=tok)
    sa, sb, sp = a.state_dict(), b.state_dict(), plain.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.o_proj.weight"], sp["model.layers.0.self_attn.o_proj.weight"])
    assert all(torch.equal(v, original[k]) for k, v in src.state_dict().items())  # the student shares no storage
    assert a.dtype == src.dtype


def test_refinement_and_its_keys_are_checked():
    with pytest.raises(ValueError, match="refine_steps > 0 needs calibration_dataset"):
        MLAArguments(refine_steps=5)
    with pytest.raises(ValueError, match="refine_lr"):
        MLAArguments(refine_lr=0.0)


def test_keep_pairs_keeps_the_fastest_frequencies_unless_told_otherwise():
    assert resolve_rope_freq_indices(MLAArguments(qk_rope_head_dim=8)) == [0, 1, 2, 3]
    assert resolve_rope_freq_indices(MLAArguments(qk_rope_head_dim=4, rope_freq_indices=[0, 5])) == [0, 5]
    assert resolve_rope_freq_indices(MLAArguments(qk_rope_head_dim=8, rope_init="xecomla")) is None


@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_refinement_fits_causal_attention_whatever_the_attention_implementation(tiny, impl):
    # a layer called on its own gets no mask: the fit must still be the causal one SDPA computes (flex and eager
    # attention attend to the whole block without a mask; flex also has no backward pass on a CPU)
    src, tok, root = tiny
    ref = upcycle(src, _args(root, refine_steps=10), log=lambda *_: None, tokenizer=tok)
    was = src.config._attn_implementation
    src.config._attn_implementation = impl
    try:
        other = upcycle(src, _args(root, refine_steps=10), log=lambda *_: None, tokenizer=tok)
    finally:
        src.config._attn_implementation = was
    assert other.config._attn_implementation == impl
    for (name, a), b in zip(ref.state_dict().items(), other.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (name, (a - b).abs().max().item(), a.abs().max().item())
