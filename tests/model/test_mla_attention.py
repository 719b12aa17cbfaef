"""Cached decoding through the compressed cache equals the full-sequence forward, naive and absorbed."""

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

from train_mla.conversion.gqa_to_mla import upcycle
from train_mla.training.arguments import MLAArguments


def _model(path, attn="sdpa", rope_init="keep_pairs", norm=False):
    src = tiny_llama(attn=attn)
    args = MLAArguments(
        q_lora_rank=24,
        kv_lora_rank=12,
        qk_rope_head_dim=8,
        rope_init=rope_init,
        mla_decode_path=path,
        use_lora_layer_norm=norm,
        mla_layers=[0, 2],
    )  # layer 1 stays GQA
    return upcycle(src, args, log=lambda *_: None).eval()


def _left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # shorter prompts, padded on the left
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("path", ["naive", "absorbed"])
@pytest.mark.parametrize("chunks", [[6, 1, 1, 1, 1, 1, 1], [5, 4, 3]])
def test_cached_decoding_matches_full_forward(path, attn, chunks):
    model = _model(path, attn, rope_init="xecomla" if attn == "eager" else "keep_pairs", norm=attn == "eager")
    ids, mask = _left_padded_batch()
    pos = _positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache, start, pieces = DynamicCache(config=model.config), 0, []
        for n in chunks:
            end = start + n
            out = model(
                ids[:, start:end],
                attention_mask=mask[:, :end],
                position_ids=pos[:, start:end],
                cache=cache,
                use_cache=True,
            )
            pieces.append(out.logits)
            start = end
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-4, rtol=1e-4)


def test_absorbed_and_naive_decode_agree_and_generate_works():
    naive, absorbed = _model("naive"), _model("absorbed")
    absorbed.load_state_dict(naive.state_dict())
    ids, mask = _left_padded_batch()
    g1 = naive.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    g2 = absorbed.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)
    # greedy generation with the cache equals argmax of repeated full forwards
    seq, m = ids[:1], mask[:1]
    for _ in range(8):
        with torch.no_grad():
            nxt = naive(seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(g1[:1], seq)


def test_cache_holds_only_latent_and_rope_key():
    model = _model("absorbed")
    cfg = model.config
    ids = torch.randint(3, 97, (2, 17))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    for i, layer in enumerate(cache.layers):
        if i in cfg.mla_layer_ids:
            assert layer.keys.shape == (2, 1, 17, cfg.ranks(i)[1])  # c_kv
            assert layer.values.shape == (2, 1, 17, cfg.qk_rope_head_dim)  # rotated k_pe
        else:
            assert layer.keys.shape == (2, cfg.num_key_value_heads, 17, cfg.head_dim)
    mla_bytes = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for i, layer in enumerate(cache.layers)
        if i in cfg.mla_layer_ids
    )
    assert mla_bytes == 2 * 17 * len(cfg.mla_layer_ids) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_bf16_forward_and_gradient_checkpointing_train():
    model = _model("naive").to(torch.bfloat16).train()
    model.activation_checkpointing_enable()
    ids = torch.randint(3, 97, (2, 9))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    g = model.model.layers[0].self_attn.kv_b_proj.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_deepseek_yarn_key_equals_the_llama3_source_outside_its_band_and_ramps_inside():
    """rope_key_scaling deepseek_yarn against formulas written out here: the source's llama3 frequencies at
    every index whose wavelength is outside [orig / high_freq_factor, orig / low_freq_factor], YaRN's linear ramp
    (floor/ceil of the band edges in key indices) inside, no cos/sin magnitude change; refused where it is not
    defined."""
    import math

    from train_mla.model.configuration_llama_mla import LlamaMLAConfig
    from train_mla.model.mla_attention import MLARotaryEmbedding

    l3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = dict(
        vocab_size=64,
        hidden_size=512,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters=l3,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        rope_freq_indices=list(range(0, 64, 2)),
    )
    inv, scale = MLARotaryEmbedding.compute_inv_freq(LlamaMLAConfig(**base, rope_key_scaling="deepseek_yarn"))
    assert scale == 1.0
    hd, d_r, theta, f, orig = 128, 64, 500000.0, 32.0, 8192
    src, lo_w, hi_w = [], orig / 1.0, orig / 4.0  # llama3: wavelengths above lo_w / f, below hi_w kept
    for i in range(0, 64, 2):
        w = theta ** (-2 * i / hd)
        wl = 2 * math.pi / w
        s = (orig / wl - 1.0) / (4.0 - 1.0)
        src.append(w if wl < hi_w else w / f if wl > lo_w else (1 - s) * w / f + s * w)
    corr = lambda rot: d_r * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
    low, high = math.floor(corr(4.0)), math.ceil(corr(1.0))
    for j, w in enumerate(src):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        want = (theta ** (-2 * j / d_r)) * ((1 - ramp) + ramp / f)
        assert inv[j].item() == pytest.approx(want, rel=1e-5), j
        if not low < j < high:
            assert inv[j].item() == pytest.approx(w, rel=1e-5), j  # outside the band: the source's own frequency
    assert sum(abs(inv[j].item() / w - 1) > 1e-3 for j, w in enumerate(src)) == 3  # j = 15, 16, 17 here
    with pytest.raises(ValueError, match="rope_key_scaling"):  # a plain-RoPE source: nothing to fit
        LlamaMLAConfig(
            **{**base, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
            rope_key_scaling="deepseek_yarn",
        )
    with pytest.raises(ValueError, match="rope_freq_indices"):  # not a geometric series
        LlamaMLAConfig(**{**base, "rope_freq_indices": list(range(32))[::-1]}, rope_key_scaling="deepseek_yarn")
    with pytest.raises(ValueError, match="rope_key_scaling"):
        LlamaMLAConfig(**base, rope_key_scaling="llama3")
