"""Data tokenised ahead by `python -m train_mla.prepare_data` is what stage 1 trains on, without tokenising again."""

import os
import subprocess
import sys

import yaml
from conftest import REPO, make_chat_data, make_tiny_checkpoint


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO)


def test_stage_one_uses_the_data_prepared_ahead(tmp_path):
    make_tiny_checkpoint(tmp_path / "model")
    make_chat_data(tmp_path / "chat.jsonl", n=48)
    recipe = {
        "model_name_or_path": str(tmp_path / "model"),
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "dataset_mixer": {str(tmp_path / "chat.jsonl"): 0.75},  # a fraction: the rows depend on the seed
        "test_split_size": 0.1,
        "max_seq_length": 64,
        "processed_cache_dir": str(tmp_path / "cache"),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "report_to": "none",
        "seed": 3,
        "use_cpu": True,
        "log_level": "info",
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    r = _run("-m", "train_mla.prepare_data", tmp_path / "recipe.yaml", "--max_seq_length", 32)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Tokenised data: train" in r.stdout and "blocks of 32 tokens" in r.stdout, r.stdout
    (cache,) = (tmp_path / "cache").iterdir()

    r = _run(REPO / "train_mla" / "train_distill.py", tmp_path / "recipe.yaml", "--max_seq_length", 32,
             "--output_dir", tmp_path / "run")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Using tokenised data cached in {cache}" in r.stdout + r.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]

    # another seed draws other rows: prepared again, not taken from the first preparation
    r = _run("-m", "train_mla.prepare_data", tmp_path / "recipe.yaml", "--max_seq_length", 32, "--seed", 4)
    assert r.returncode == 0 and "Tokenised data: train" in r.stdout, r.stderr[-3000:]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_bad_recipe_is_one_line():
    r = _run("-m", "train_mla.prepare_data", "no_such_recipe.yaml")
    assert r.returncode == 1 and r.stderr.strip() == "error: recipe file 'no_such_recipe.yaml' does not exist", r.stderr
