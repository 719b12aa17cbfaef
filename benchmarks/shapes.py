"""Model shapes the benchmarks build with random weights: Llama-3.2-1B and Llama-3.1-8B as published, a tiny shape for
`--smoke` runs on CPU, SmolLM2-135M, and the MLA settings of `llama3.2_1B/mla_kv_rank_64_8bt.yaml` and
`smollm2_135M/mla_kv_rank_80_rope_16.yaml`."""

import sys
from pathlib import Path

from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.conversion.gqa_to_mla import build_config  # noqa: E402
from train_mla.training.arguments import MLAArguments  # noqa: E402


def _llama3_rope(factor: float) -> dict:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_parameters=_llama3_rope(32.0),
)
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    rope_parameters=_llama3_rope(8.0),
)
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
MLA_1B = MLAArguments(q_lora_rank=1424, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64)
MLA_SMOLLM2_25 = MLAArguments(
    q_lora_rank=None, kv_lora_rank=80, qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=64
)
MLA_TINY = MLAArguments(q_lora_rank=32, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def config(shape: dict, mla: MLAArguments | None = None):
    """A LlamaConfig of `shape` (SDPA attention), or its LlamaMLAConfig when `mla` is given."""
    cfg = LlamaConfig(**shape)
    if mla is not None:
        cfg = build_config(cfg, mla)
    cfg._attn_implementation = "sdpa"
    return cfg
