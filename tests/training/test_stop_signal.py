"""SIGTERM during training: the step finishes, a checkpoint is saved, the script exits 143, a re-run resumes."""

import json
import os
import signal
import subprocess
import sys

import yaml
from conftest import REPO, make_chat_data, make_tiny_checkpoint
from transformers import TrainerControl, TrainerState, TrainingArguments

from train_mla.training.stop_signal import StopOnSignal


def test_a_signal_asks_for_one_checkpoint_and_a_stop(tmp_path):
    old = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopOnSignal(signals=(signal.SIGUSR1,))
        args, control = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), TrainerControl()
        stop.on_step_end(args, TrainerState(global_step=3), control)
        assert not control.should_save and not control.should_training_stop and stop.exit_code() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one (a forwarding launcher) changes nothing
        control.should_evaluate = True  # an evaluation due at this step (eval_steps) is skipped: time is short
        stop.on_step_end(args, TrainerState(global_step=4), control)
        assert control.should_save and control.should_training_stop and not control.should_evaluate
        assert stop.stopped_at == 4 and stop.exit_code() == 128 + signal.SIGUSR1
        planned, control = StopOnSignal(signals=(), stop_at_step=4), TrainerControl(should_evaluate=True)
        planned.on_step_end(args, TrainerState(global_step=4), control)  # a planned stop keeps its curve point
        assert control.should_save and control.should_training_stop and control.should_evaluate
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(tmp_path):
    make_tiny_checkpoint(tmp_path / "model")
    make_chat_data(tmp_path / "chat.jsonl", n=64)
    recipe = {
        "model_name_or_path": str(tmp_path / "model"),
        "torch_dtype": "float32",
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "rope_init": "keep_pairs",
        "dataset_mixer": {str(tmp_path / "chat.jsonl"): 1.0},
        "max_seq_length": 64,
        "processed_cache_dir": str(tmp_path / "cache"),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 400,
        "logging_steps": 1,
        "save_steps": 100000,
        "report_to": "none",
        "use_cpu": True,
        "loss_chunk_size": 50,
        "eval_strategy": "no",
        "log_level": "info",
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, str(REPO / "train_mla" / "train_distill.py"), str(tmp_path / "recipe.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines = []
    for line in proc.stdout:  # the console progress line of step 3, then the signal
        lines.append(line)
        if "[train_mla] stage 1 | step 3/400" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    out = "".join(lines)
    assert proc.wait(timeout=120) == 143, out[-3000:]
    assert "SIGTERM received" in out and "run the same command again" in out, out[-3000:]
    run = tmp_path / "run"
    ckpts = sorted(run.glob("checkpoint-*"))
    assert len(ckpts) == 1, out[-3000:]
    step = int(ckpts[0].name.split("-")[1])
    assert 3 <= step < 400, step
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["global_step"] == step
    assert not (run / "model.safetensors").exists()  # no final model from an interrupted run

    r = subprocess.run(cmd + ["--max_steps", "400"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from {ckpts[0]}" in r.stdout + r.stderr
    state = json.loads((run / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 400 and steps[0] == 1 and steps[step] == step + 1  # history kept, then continued
    assert (run / "model.safetensors").is_file()
