"""Save/load round trips, strict loading, remote-code loading, and the converter command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, STORIES, needs_shared, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from train_mla import LlamaMLAForCausalLM
from train_mla.conversion.gqa_to_mla import upcycle
from train_mla.conversion.upcycled_folder import save_mla_checkpoint
from train_mla.training.arguments import MLAArguments


def _converted(**kw):
    src = tiny_llama()
    args = MLAArguments(**{**dict(q_lora_rank=24, kv_lora_rank=12, qk_rope_head_dim=8, kv_energy_ratio=0.6), **kw})
    return src, upcycle(src, args, log=lambda *_: None)


def test_save_load_same_logits_and_per_layer_ranks(tmp_out):
    src, model = _converted()
    save_mla_checkpoint(model, None, tmp_out, src.config)
    assert (tmp_out / "model.safetensors").is_file()
    cfg = json.loads((tmp_out / "config.json").read_text())
    assert cfg["model_type"] == "llama_mla" and "AutoModelForCausalLM" in cfg["auto_map"]
    assert cfg["layer_ranks"] == model.config.layer_ranks
    loaded = AutoModelForCausalLM.from_pretrained(tmp_out)
    assert isinstance(loaded, LlamaMLAForCausalLM)
    x = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    kv = json.loads((tmp_out / "kv_cache.json").read_text())
    assert kv["mla_elements_per_token_per_layer"] == [model.config.ranks(i)[1] + 8 for i in range(3)]


def test_missing_or_unexpected_tensor_is_named(tmp_out):
    src, model = _converted()
    save_mla_checkpoint(model, None, tmp_out, src.config)
    weights = load_file(tmp_out / "model.safetensors")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    missing = {k: v for k, v in weights.items() if k != name}
    save_file(missing, tmp_out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LlamaMLAForCausalLM.from_pretrained(tmp_out)
    save_file(
        {**weights, "model.layers.1.self_attn.k_proj.weight": torch.zeros(2)},
        tmp_out / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        LlamaMLAForCausalLM.from_pretrained(tmp_out)


def test_trust_remote_code_loads_without_the_package(tmp_out, tmp_path):
    src, model = _converted()
    save_mla_checkpoint(model, None, tmp_out, src.config)
    x = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        want = model(x).logits
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_out)!r}, trust_remote_code=True)\n"
        "assert 'train_mla' not in sys.modules, 'the package was imported'\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        f"d = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(m(d['x']).logits, d['want'], atol=1e-5, rtol=0)\nprint('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "train_mla.upcycle", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_converter_help_documents_every_option():
    out = _cli("--help")
    assert out.returncode == 0
    for key in ("--model_name_or_path", "--kv_lora_rank", "--q_energy_ratio", "--rope_init", "--output"):
        assert key in out.stdout


def test_converter_refuses_bad_key_and_offline_hub_id(tmp_out):
    out = _cli("--model_name_or_path", "meta-llama/Llama-3.2-1B-Instruct", "--output", tmp_out)
    assert out.returncode != 0 and "HF_HUB_OFFLINE" in out.stderr
    out = _cli("--model_name_or_path", "x", "--kv_lora_rnk", "8", "--output", tmp_out)
    assert out.returncode != 0 and "kv_lora_rnk" in out.stderr and "kv_lora_rank" in out.stderr
    assert not tmp_out.exists()


@needs_shared
def test_converter_on_stories260k_and_refuses_to_overwrite(tmp_out):
    args = [
        "--model_name_or_path",
        STORIES,
        "--q_lora_rank",
        32,
        "--kv_lora_rank",
        8,
        "--qk_rope_head_dim",
        4,
        "--torch_dtype",
        "float32",
        "--output",
        tmp_out,
    ]
    out = _cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| MLA | 12 |" in out.stdout and "18.750 %" in out.stdout  # (8 + 4) / (2 * 4 KV heads * 8 dims)
    assert (tmp_out / "tokenizer.json").is_file()
    again = _cli(*args)
    assert again.returncode != 0 and "not empty" in again.stderr
