"""Stage-2 DPO on a tiny distilled MLA model: preference rewards rise and the output is a loadable MLA model."""

import json
import os
import subprocess
import sys

import torch
import yaml
from conftest import REPO, make_chat_data, make_tiny_checkpoint, synthetic_sentences


def _run(script, recipe, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "train_mla" / script), str(recipe), *map(str, overrides)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )


def _stage1(tmp_path, n: int, **over):
    """A tiny distilled MLA model in tmp_path/stage1 (the DPO tests start from it)."""
    make_tiny_checkpoint(tmp_path / "model")
    make_chat_data(tmp_path / "chat.jsonl", n=n)
    distill = {
        "model_name_or_path": str(tmp_path / "model"),
        "torch_dtype": "float32",
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "dataset_mixer": {str(tmp_path / "chat.jsonl"): 1.0},
        "max_seq_length": 64,
        "processed_cache_dir": str(tmp_path / "cache"),
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "output_dir": str(tmp_path / "stage1"),
        **over,
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(distill))
    r = _run("train_distill.py", tmp_path / "distill.yaml")
    assert r.returncode == 0, r.stderr[-4000:]


def test_dpo_after_distillation(tmp_path):
    _stage1(tmp_path, 48, learning_rate=3e-3, max_steps=10)

    # a learnable preference: always answer "the cat sees the ball." rather than another sentence
    sents = synthetic_sentences(200, seed=5)
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for s in sents:
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": s}],
                        "chosen": [{"role": "assistant", "content": "the cat sees the ball."}],
                        "rejected": [{"role": "assistant", "content": s}],
                    }
                )
                + "\n"
            )
    dpo = {
        "model_name_or_path": str(tmp_path / "stage1"),
        "torch_dtype": "float32",
        "dataset_mixer": {str(tmp_path / "prefs.jsonl"): 1.0},
        "beta": 0.1,
        "max_length": 64,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": 16,
        "logging_steps": 4,
        "activation_checkpointing": False,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "output_dir": str(tmp_path / "stage2"),
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    r = _run("train_dpo.py", tmp_path / "dpo.yaml")
    assert r.returncode == 0, r.stderr[-4000:]
    hist = [
        h
        for h in json.loads((tmp_path / "stage2" / "trainer_state.json").read_text())["log_history"]
        if "rewards/margins" in h
    ]
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"] and hist[-1]["rewards/accuracies"] >= 0.9, hist
    assert hist[-1]["loss"] < hist[0]["loss"]

    from train_mla import LlamaMLAForCausalLM

    before = LlamaMLAForCausalLM.from_pretrained(tmp_path / "stage1")
    after = LlamaMLAForCausalLM.from_pretrained(tmp_path / "stage2")
    assert after.config.layer_ranks == before.config.layer_ranks
    x = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        assert not torch.allclose(after(x).logits, before(x).logits)
    assert (tmp_path / "stage2" / "kv_cache.json").is_file() and (tmp_path / "stage2" / "tokenizer.json").is_file()
    # finished runs keep no optimizer states (keep_checkpoints: false) and carry their own model card
    for stage in ("stage1", "stage2"):
        assert not list((tmp_path / stage).glob("checkpoint-*")), stage
    card = (tmp_path / "stage2" / "README.md").read_text()
    assert "DPO model" in card and str(tmp_path / "stage1") in card and "bytes per token" in card and "None" not in card


def test_dpo_under_bf16_autocast_moves_the_weights_as_fp32_does(tmp_path):
    """DPO's small learning rates need fp32 master weights: a bf16 policy would round most of these steps away."""
    from safetensors.torch import load_file

    _stage1(tmp_path, 32, max_steps=1, learning_rate=1e-12)  # stage 1 = the upcycled model
    sents = synthetic_sentences(64, seed=5)
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for s in sents:
            f.write(json.dumps({"prompt": s, "chosen": " the cat sees the ball.", "rejected": " " + s}) + "\n")
    dpo = {
        "model_name_or_path": str(tmp_path / "stage1"),
        "dataset_mixer": {str(tmp_path / "prefs.jsonl"): 1.0},
        "beta": 0.1,
        "max_length": 64,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "max_steps": 3,
        "activation_checkpointing": False,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    start = load_file(tmp_path / "stage1" / "model.safetensors")
    updates = []
    for name, extra in (
        ("mixed", ["--bf16", "true", "--torch_dtype", "bfloat16"]),
        ("ref", ["--bf16", "false", "--torch_dtype", "float32"]),
    ):
        r = _run("train_dpo.py", tmp_path / "dpo.yaml", "--output_dir", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-4000:]
        end = load_file(tmp_path / name / "model.safetensors")
        assert end["lm_head.weight"].dtype == torch.float32
        updates.append(torch.cat([(end[k].double() - start[k].double()).flatten() for k in sorted(start)]))
    mixed, ref = updates
    ratio, cos = (mixed.norm() / ref.norm()).item(), torch.nn.functional.cosine_similarity(mixed, ref, dim=0).item()
    assert 0.8 < ratio < 1.25 and cos > 0.9, (ratio, cos)
