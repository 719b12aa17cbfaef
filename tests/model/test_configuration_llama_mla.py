"""Every MLA config field is validated on construction with an error that names it."""

import pytest

from train_mla import LlamaMLAConfig

BASE = dict(
    vocab_size=50,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
)


def test_defaults_are_derived_from_head_dim():
    cfg = LlamaMLAConfig(**BASE)
    assert (cfg.head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim) == (16, 8, 16)
    assert cfg.rope_freq_indices == [0, 2, 4, 6]  # every head_dim // d_r-th frequency of the 8 pairs
    assert cfg.mla_layer_ids == {0, 1, 2, 3}
    assert cfg.ranks(2) == (32, 16)


def test_layer_ranks_override_and_round_trip(tmp_path):
    cfg = LlamaMLAConfig(**BASE, layer_ranks={1: {"q_lora_rank": 24, "kv_lora_rank": 8}}, mla_layers=[1, 3])
    cfg.save_pretrained(tmp_path)
    again = LlamaMLAConfig.from_pretrained(tmp_path)
    assert again.ranks(1) == (24, 8) and again.ranks(3) == (32, 16)
    assert again.mla_layers == [1, 3]


@pytest.mark.parametrize(
    "override, field",
    [
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"kv_lora_rank": 65}, "kv_lora_rank"),  # > min(hidden, H*(d_n+d_v)) = 64
        ({"q_lora_rank": 65}, "q_lora_rank"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"qk_rope_head_dim": 18}, "qk_rope_head_dim"),
        ({"qk_nope_head_dim": 4}, "qk_nope_head_dim"),
        ({"v_head_dim": 8}, "v_head_dim"),
        ({"mla_layers": [0, 4]}, "mla_layers"),
        ({"mla_layers": [-1]}, "mla_layers"),
        ({"mla_decode_path": "fast"}, "mla_decode_path"),
        ({"rope_freq_indices": [0, 1, 2, 8]}, "rope_freq_indices"),
        ({"rope_freq_indices": [0, 1]}, "rope_freq_indices"),
        ({"layer_ranks": {"7": {"kv_lora_rank": 8}}}, "layer_ranks"),
        ({"layer_ranks": {"1": {"kv_rank": 8}}}, "layer_ranks['1']"),
        ({"layer_ranks": {"1": {"kv_lora_rank": 0}}}, "layer_ranks['1'].kv_lora_rank"),
    ],
)
def test_invalid_field_names_itself(override, field):
    with pytest.raises(ValueError) as err:
        LlamaMLAConfig(**{**BASE, **override})
    assert f"LlamaMLAConfig.{field}=" in str(err.value)
    assert "allowed" in str(err.value)
