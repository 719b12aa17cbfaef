"""KV accounting and paper-scale shapes, built from configs alone on the meta device (no weights)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train_mla.conversion.gqa_to_mla import build_config
from train_mla.model.kv_cache_size import format_kv_table, kv_cache_table
from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM
from train_mla.training.arguments import MLAArguments

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Published configs of the three source models
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_parameters=LLAMA3_ROPE,
)
LLAMA_3B = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_parameters=LLAMA3_ROPE,
)
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)

CASES = {  # source, (q, kv, rope), MLA / GQA values per token and layer, expected ratio
    "llama3.2-1B": (LLAMA_1B, (1424, 64, 32), 96, 1024, 0.09375),
    "llama3.2-3B": (LLAMA_3B, (2048, 96, 64), 160, 2048, 0.078125),
    "smollm2-135M": (SMOLLM2, (400, 16, 32), 48, 384, 0.125),
}


def _build(name):
    src_kw, (q, kv, rope), *_ = CASES[name]
    src_cfg = LlamaConfig(**src_kw)
    cfg = build_config(src_cfg, MLAArguments(q_lora_rank=q, kv_lora_rank=kv, qk_rope_head_dim=rope))
    with torch.device("meta"):
        return src_cfg, cfg, LlamaForCausalLM(src_cfg), LlamaMLAForCausalLM(cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_kv_ratio_of_the_paper_settings(name):
    src_cfg, cfg, _, _ = _build(name)
    _, _, mla_elems, gqa_elems, ratio = CASES[name]
    t = kv_cache_table(src_cfg, cfg)
    assert set(t["mla_elements_per_token_per_layer"]) == {mla_elems}
    assert set(t["source_elements_per_token_per_layer"]) == {gqa_elems}
    assert t["kv_ratio"] == pytest.approx(ratio)
    assert t["mla_bytes_per_token"] == mla_elems * cfg.num_hidden_layers * 2
    assert f"{100 * ratio:.3f} %" in format_kv_table(t)


def test_llama_1b_shapes_and_parameter_counts_match_the_paper():
    _, _, src, mla = _build("llama3.2-1B")
    attn = mla.model.layers[0].self_attn
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (1424, 2048),
        "q_b_proj.weight": (2048, 1424),
        "kv_a_proj_with_mqa.weight": (96, 2048),
        "kv_b_proj.weight": (3072, 64),
        "o_proj.weight": (2048, 2048),
    }
    assert sum(p.numel() for p in attn.parameters()) == 10_420_224  # reference section 1.7
    n_src = sum(p.numel() for p in src.parameters())
    n_mla = sum(p.numel() for p in mla.parameters())
    assert n_src - n_mla == 16 * 65_536  # r_q 1424 keeps the attention size: 65,536 fewer per layer
    assert round(n_mla / 1e9, 2) == 1.23 and round(n_src / 1e9, 2) == 1.24


def test_llama_3b_shapes():
    _, _, _, mla = _build("llama3.2-3B")
    shapes = {n: tuple(p.shape) for n, p in mla.model.layers[5].self_attn.named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (2048, 3072),
        "q_b_proj.weight": (3072, 2048),
        "kv_a_proj_with_mqa.weight": (160, 3072),
        "kv_b_proj.weight": (4608, 96),
        "o_proj.weight": (3072, 3072),
    }
