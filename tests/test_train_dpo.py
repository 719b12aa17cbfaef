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
    return subprocess.run([sys.executable, str(REPO / "train_mla" / script), str(recipe), *map(str, overrides)],
                          capture_output=True, text=True, env=env, cwd=REPO)


def test_dpo_after_distillation(tmp_path):
    make_tiny_checkpoint(tmp_path / "model")
    make_chat_data(tmp_path / "chat.jsonl", n=48)
    distill = {"model_name_or_path": str(tmp_path / "model"), "torch_dtype": "float32", "q_lora_rank": 32,
               "kv_lora_rank": 16, "qk_rope_head_dim": 8, "dataset_mixer": {str(tmp_path / "chat.jsonl"): 1.0},
               "max_seq_length": 64, "processed_cache_dir": str(tmp_path / "cache"), "per_device_train_batch_size": 4,
               "learning_rate": 3e-3, "max_steps": 10, "report_to": "none", "use_cpu": True,
               "output_dir": str(tmp_path / "stage1")}
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(distill))
    r = _run("train_distill.py", tmp_path / "distill.yaml")
    assert r.returncode == 0, r.stderr[-4000:]

    # a learnable preference: always answer "the cat sees the ball." rather than another sentence
    sents = synthetic_sentences(200, seed=5)
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for s in sents:
            f.write(json.dumps({"prompt": [{"role": "user", "content": s}],
                                "chosen": [{"role": "assistant", "content": "the cat sees the ball."}],
                                "rejected": [{"role": "assistant", "content": s}]}) + "\n")
    dpo = {"model_name_or_path": str(tmp_path / "stage1"), "torch_dtype": "float32",
           "dataset_mixer": {str(tmp_path / "prefs.jsonl"): 1.0}, "beta": 0.1, "max_length": 64,
           "per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 16, "logging_steps": 4,
           "activation_checkpointing": False, "report_to": "none", "use_cpu": True, "seed": 0,
           "output_dir": str(tmp_path / "stage2")}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    r = _run("train_dpo.py", tmp_path / "dpo.yaml")
    assert r.returncode == 0, r.stderr[-4000:]
    hist = [h for h in json.loads((tmp_path / "stage2" / "trainer_state.json").read_text())["log_history"]
            if "rewards/margins" in h]
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
