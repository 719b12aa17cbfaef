"""Stage-1 script end to end on a tiny model: loss falls, resume is exact, ZeRO-3 runs and saves a loadable model."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_chat_data, make_tiny_checkpoint
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    make_tiny_checkpoint(root / "model")
    make_chat_data(root / "chat.jsonl", n=96)
    recipe = {
        "model_name_or_path": str(root / "model"),
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "rope_init": "keep_pairs",
        "dataset_mixer": {str(root / "chat.jsonl"): 1.0},
        "test_split_size": 0.1,
        "max_seq_length": 64,
        "processed_cache_dir": str(root / "cache"),
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "max_steps": 30,
        "logging_steps": 1,
        "save_steps": 10,
        "save_total_limit": 3,
        "report_to": "none",
        "seed": 1,
        "use_cpu": True,
        "kl_weight": 1.0,
        "ce_weight": 0.1,
        "loss_chunk_size": 50,
        "log_level": "info",
        "keep_checkpoints": True,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _run(recipe, *overrides, launcher=None):
    cmd = (launcher or [sys.executable]) + [
        str(REPO / "train_mla" / "train_distill.py"),
        str(recipe),
        *map(str, overrides),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)


def _history(out):
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_loss_falls_and_resume_reproduces_an_uninterrupted_run(tiny_run):
    full = tiny_run / "full"
    r = _run(tiny_run / "recipe.yaml", "--output_dir", full)
    assert r.returncode == 0, r.stderr[-4000:]
    hist = _history(full)
    assert [h["step"] for h in hist][:3] == [1, 2, 3] and hist[-1]["step"] == 30
    first, last = sum(h["loss"] for h in hist[:3]) / 3, sum(h["loss"] for h in hist[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert all(k in hist[0] for k in ("kl", "ce", "learning_rate", "grad_norm", "tokens_per_second_per_device"))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "kv_cache.json"):
        assert (full / name).is_file(), name
    assert (full / "upcycled" / "model.safetensors").is_file()

    # a run killed after its step-10 checkpoint leaves exactly this behind
    crashed = tiny_run / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "upcycled", crashed / "upcycled")
    shutil.copytree(full / "checkpoint-10", crashed / "checkpoint-10")
    r = _run(tiny_run / "recipe.yaml", "--output_dir", crashed)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Resuming from" in r.stdout + r.stderr
    resumed_hist = _history(crashed)
    assert resumed_hist[0]["step"] == 1 and resumed_hist[-1]["step"] == 30  # history restored, then continued
    a, b = load_file(full / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    for h1, h2 in zip(hist[10:], resumed_hist[10:]):
        assert h1["step"] == h2["step"] and abs(h1["loss"] - h2["loss"]) < 1e-5


def test_refuses_a_finished_output_dir_and_bad_recipes(tiny_run):
    from safetensors.torch import save_file

    done = tiny_run / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    save_file({"w": torch.ones(4)}, done / "model.safetensors")
    for name in ("tokenizer_config.json", "README.md"):  # what finish_run writes after the weights
        (done / name).write_text("{}")
    r = _run(tiny_run / "recipe.yaml", "--output_dir", done)
    assert r.returncode != 0 and "finished model" in r.stderr
    (done / "model.safetensors").write_bytes(b"")  # a final save cut short, with no checkpoint to resume from
    r = _run(tiny_run / "recipe.yaml", "--output_dir", done)
    assert r.returncode != 0 and "half-written final model" in r.stderr
    r = _run(tiny_run / "recipe.yaml", "--output_dir", tiny_run / "x", "--kv_lora_rnak", "8")
    assert r.returncode != 0 and "kv_lora_rnak" in r.stderr and "did you mean 'kv_lora_rank'" in r.stderr
    r = _run(tiny_run / "recipe.yaml", "--output_dir", tiny_run / "x", "--learning_rate", "fast")
    assert r.returncode != 0 and "learning_rate" in r.stderr
    assert not (tiny_run / "x").exists()


def test_teacher_with_another_vocabulary_is_refused(tiny_run, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "teacher"
    make_tiny_checkpoint(other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    r = _run(tiny_run / "recipe.yaml", "--output_dir", tmp_path / "o", "--teacher_model_name_or_path", other)
    assert r.returncode != 0 and "do not share a vocabulary" in r.stderr


@pytest.mark.parametrize("procs", [1, 2])
def test_deepspeed_zero3_through_accelerate_launch(tiny_run, procs):
    out = tiny_run / f"zero3_{procs}"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "deepspeed_zero3.yaml"),
        "--num_processes",
        str(procs),
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(29500 + procs),
    ]
    bs = 4 // procs  # same global batch as the plain run
    r = _run(
        tiny_run / "recipe.yaml",
        "--output_dir",
        out,
        "--max_steps",
        6,
        "--save_steps",
        3,
        "--use_cpu",
        "false",
        "--per_device_train_batch_size",
        bs,
        launcher=launcher,
    )
    assert r.returncode == 0, r.stderr[-6000:]
    from train_mla import LlamaMLAForCausalLM

    model = LlamaMLAForCausalLM.from_pretrained(out)  # strict: every tensor gathered from the shards
    ref = LlamaMLAForCausalLM.from_pretrained(out / "upcycled")
    x = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        logits, before = model(x).logits, ref(x).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, before)  # trained, and loadable
    hist = _history(out)
    assert len(hist) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    if procs == 1:  # one process: the same numbers as the plain (non-DeepSpeed) run of the same recipe
        plain = _history(tiny_run / "full")[:6] if (tiny_run / "full").exists() else None
        if plain:
            assert abs(plain[0]["loss"] - hist[0]["loss"]) < 1e-4


def _update(run_dir):
    """{name: final - initial} of every weight, in float64 (initial = the upcycled model the run started from)."""
    start, end = load_file(run_dir / "upcycled" / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert start.keys() == end.keys()
    return {k: end[k].double() - start[k].double() for k in start}


def test_bf16_autocast_keeps_fp32_master_weights(tiny_run):
    """A few steps at a small learning rate under bf16 autocast move the weights as the fp32 reference run does.

    With bf16 weights most of these updates (lr 1e-5, below half a bf16 spacing for weights of ~0.1) round away.
    """
    small = [
        "--max_steps",
        4,
        "--learning_rate",
        1e-5,
        "--lr_scheduler_type",
        "constant",
        "--warmup_steps",
        0,
        "--save_steps",
        1000,
        "--logging_steps",
        2,
    ]
    mixed, ref = tiny_run / "bf16_autocast", tiny_run / "fp32_reference"
    r = _run(tiny_run / "recipe.yaml", "--output_dir", mixed, "--bf16", "true", "--torch_dtype", "bfloat16", *small)
    assert r.returncode == 0, r.stderr[-4000:]
    r = _run(tiny_run / "recipe.yaml", "--output_dir", ref, "--bf16", "false", "--torch_dtype", "float32", *small)
    assert r.returncode == 0, r.stderr[-4000:]
    assert load_file(mixed / "model.safetensors")["lm_head.weight"].dtype == torch.float32
    a, b = _update(mixed), _update(ref)
    da, db = torch.cat([v.flatten() for v in a.values()]), torch.cat([v.flatten() for v in b.values()])
    moved = ((da != 0) == (db != 0)).double().mean().item()  # unseen tokens' embedding rows stay put in both
    ratio, cos = (da.norm() / db.norm()).item(), torch.nn.functional.cosine_similarity(da, db, dim=0).item()
    print(f"moved alike {moved:.4f}, norm ratio {ratio:.4f}, cosine {cos:.4f}")
    assert moved > 0.99, f"{moved:.1%} of the weights moved (or stayed) as in the fp32 reference"
    assert 0.9 < ratio < 1.1 and cos > 0.95, (ratio, cos)


def test_a_leftover_upcycled_model_is_reused_only_for_the_same_settings(tiny_run, tmp_path):
    full = tiny_run / "full"
    if not (full / "upcycled").is_dir():
        pytest.skip("needs the run of test_loss_falls_and_resume_reproduces_an_uninterrupted_run")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(full / "upcycled", other / "upcycled")
    r = _run(tiny_run / "recipe.yaml", "--output_dir", other, "--kv_lora_rank", 8, "--max_steps", 2)
    assert (
        r.returncode != 0
        and "upcycled with other settings" in r.stderr
        and "mla_arguments.kv_lora_rank: 16 there, 8 now" in r.stderr
    )
    assert "Tokenis" not in r.stdout + r.stderr  # refused before any heavy work
    # a half-written one (0-byte config) is removed and made again
    (other / "upcycled" / "config.json").write_text("")
    r = _run(tiny_run / "recipe.yaml", "--output_dir", other, "--max_steps", 2, "--save_steps", 100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Removing the incomplete upcycled model" in r.stdout + r.stderr
    assert json.loads((other / "config.json").read_text())["kv_lora_rank"] == 16


@pytest.mark.parametrize("case", ["bf16_without_gpu", "hub_model_offline"])
def test_an_error_every_process_finds_is_one_line(tiny_run, tmp_path, case):
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "deepspeed_zero3.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        "29507",
    ]
    overrides = ["--bf16", "true", "--use_cpu", "false"]  # a recipe error, in the recipe's parsing
    expected = ["2 processes were launched on a machine without a GPU", "python train_mla/train_distill.py RECIPE"]
    if case == "hub_model_offline":  # a model that cannot be found, in the checks before loading
        overrides = ["--bf16", "false", "--model_name_or_path", "nobody/no-such-model"]
        expected = ["'nobody/no-such-model' is a hub id"]
    r = _run(tiny_run / "recipe.yaml", "--output_dir", tmp_path / "o", *overrides, launcher=launcher)
    assert r.returncode != 0
    ours = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and all(e in ours[0] for e in expected), r.stderr[-3000:]
    # the other process left first, with exit 0: the launcher's summary lists the main process's failure alone
    assert not re.search(r"rank\s*:\s*1\b", r.stderr), r.stderr[-3000:]
    assert not list(Path(tempfile.gettempdir()).glob("train_mla-failed-start-29507-*"))


def test_a_checkpoint_of_another_recipe_is_refused_before_any_heavy_work(tiny_run, tmp_path):
    full = tiny_run / "full"
    if not (full / "checkpoint-10").is_dir():
        pytest.skip("needs the run of test_loss_falls_and_resume_reproduces_an_uninterrupted_run")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(full / "checkpoint-10", other / "checkpoint-10")  # made with kv_lora_rank 16
    r = _run(tiny_run / "recipe.yaml", "--output_dir", other, "--kv_lora_rank", 8)
    assert r.returncode != 0 and "kv_lora_rank: 16 there, 8 in the recipe" in r.stderr, r.stderr[-2000:]
    assert "Tokenis" not in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_a_checkpoint_whose_config_disagrees_with_its_weights_is_one_line_before_any_heavy_work(tiny_run, tmp_path):
    """A checkpoint whose config.json was edited (kv_lora_rank 16 -> 8) while its weights stayed: refused with one line
    naming the weight and both shapes, before tokenising, not a size-mismatch traceback from loading."""
    full = tiny_run / "full"
    if not (full / "checkpoint-10").is_dir():
        pytest.skip("needs the run of test_loss_falls_and_resume_reproduces_an_uninterrupted_run")
    other = tmp_path / "edited"
    shutil.copytree(full / "checkpoint-10", other / "checkpoint-10")
    config = json.loads((other / "checkpoint-10" / "config.json").read_text())
    assert config["kv_lora_rank"] == 16
    ranks = {layer: {**r, "kv_lora_rank": 8} for layer, r in (config.get("layer_ranks") or {}).items()}
    (other / "checkpoint-10" / "config.json").write_text(
        json.dumps({**config, "kv_lora_rank": 8, "layer_ranks": ranks})
    )
    r = _run(tiny_run / "recipe.yaml", "--output_dir", other, "--kv_lora_rank", 8)
    assert r.returncode != 0 and "do not match its own config.json" in r.stderr, r.stderr[-2000:]
    assert "kv_a_proj" in r.stderr and "Traceback" not in r.stderr and "Tokenis" not in r.stdout + r.stderr


def test_an_upcycled_folder_from_the_upcycle_command_is_reused_and_bf16_is_refused(tiny_run, tmp_path):
    """`python -m train_mla.upcycle RECIPE --torch_dtype float32 --output RUN/upcycled` writes what stage 1 would:
    stage 1 reuses it; written in bfloat16 it is refused before any heavy work (no fp32 master weights from it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for dtype in ("float32", "bfloat16"):
        run = tmp_path / dtype
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "train_mla.upcycle",
                str(tiny_run / "recipe.yaml"),
                "--torch_dtype",
                dtype,
                "--output",
                str(run / "upcycled"),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    r = _run(tiny_run / "recipe.yaml", "--output_dir", tmp_path / "float32", "--max_steps", 2, "--save_steps", 100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Reusing the upcycled model" in r.stdout + r.stderr and "Upcycled " not in r.stdout + r.stderr
    r = _run(tiny_run / "recipe.yaml", "--output_dir", tmp_path / "bfloat16", "--max_steps", 2)
    assert r.returncode != 0 and "holds bfloat16 weights" in r.stderr and "--torch_dtype float32" in r.stderr
    assert "Tokenis" not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        (["--kv_lora_rank", "0"], "kv_lora_rank=0 is invalid"),
        (["--kv_lora_rank", "100000"], "kv_lora_rank=100000 is invalid"),
        (["--qk_rope_head_dim", "7"], "qk_rope_head_dim=7 is invalid"),
        (["--torch_dtype", "fp32"], "torch_dtype='fp32'"),
        (["--output_dir"], "'--output_dir' has no value"),
        (["--export_deepseek_dir", "/nonexistent/ds"], "export_deepseek_dir needs use_lora_layer_norm: true"),
        (
            ["--init_method", "activation", "--calibration_dataset", "/nonexistent/calib.jsonl"],
            "calibration_dataset '/nonexistent/calib.jsonl' does not exist",
        ),
    ],
)
def test_bad_settings_fail_before_any_heavy_work(tiny_run, tmp_path, override, message):
    out = ["--output_dir", tmp_path / "o"] if override != ["--output_dir"] else []
    r = _run(tiny_run / "recipe.yaml", *out, *override)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert "Tokenis" not in r.stdout + r.stderr and "Traceback" not in r.stderr


WSD = [
    "--max_steps",
    12,
    "--lr_scheduler_type",
    "warmup_stable_decay",
    "--lr_scheduler_kwargs",
    '{"num_decay_steps": 4}',
    "--save_steps",
    100,
]


def test_a_run_across_allocations_equals_one_long_run(tiny_run, tmp_path):
    """stop_at_step ends an allocation with a checkpoint; packed into checksummed parts, unpacked into an empty folder
    on 'another machine' (no upcycled model there), the same command continues it to exactly the uninterrupted run's
    model. Weights only: the first continued step is exactly the long run's, the learning rates all are (or, under
    continuation_warmup_steps, ramp up to them)."""
    from train_mla.checkpoint_transfer import main as transfer

    full = tmp_path / "full"
    r = _run(tiny_run / "recipe.yaml", "--output_dir", full, *WSD)
    assert r.returncode == 0, r.stderr[-4000:]
    hist = _history(full)
    lrs = [h["learning_rate"] for h in hist]
    assert lrs[2] == lrs[6] > lrs[-1]  # warmup 2, stable, decay over the last 4

    first = tmp_path / "first"
    r = _run(tiny_run / "recipe.yaml", "--output_dir", first, *WSD, "--stop_at_step", 6)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Stopped at step 6/12 as asked" in r.stdout + r.stderr
    assert (first / "checkpoint-6" / "optimizer.pt").is_file() and not (first / "config.json").exists()
    assert (first / "checkpoint-6" / "kv_cache.json").is_file()  # every checkpoint carries the KV-cache record

    for kind in ("whole", "weights", "weights_bf16"):  # bf16: the master weights rounded once, for a smaller transfer
        weights_only = kind != "whole"
        parts, second = tmp_path / f"parts_{kind}", tmp_path / f"second_{kind}"
        transfer(
            ["pack", str(first / "checkpoint-6"), str(parts), "--part_mib", "1"]
            + (["--weights_only"] if weights_only else [])
            + (["--weights_dtype", "bfloat16"] if kind == "weights_bf16" else [])
        )
        assert len(list(parts.glob("checkpoint-6.part*"))) == (1 if weights_only else 2)  # 0.7 MiB, 1.9 MiB
        manifest = json.loads((parts / "checkpoint-6.manifest.json").read_text())
        assert manifest["weights_dtype"] == ("bfloat16" if kind == "weights_bf16" else "float32")
        transfer(["unpack", str(parts), str(second)])
        assert (second / "checkpoint-6" / "optimizer.pt").is_file() != weights_only
        ramp = 3 if kind == "weights_bf16" else 0  # fresh Adam moments under a learning rate ramped over 3 steps
        console = ""
        if kind == "weights":  # a second allocation ends too: its checkpoint still has the record for a third
            r = _run(
                tiny_run / "recipe.yaml",
                "--output_dir",
                second,
                *WSD,
                "--continuation_warmup_steps",
                0,
                "--stop_at_step",
                9,
            )
            assert r.returncode == 0, r.stderr[-4000:]
            assert (second / "checkpoint-9" / "kv_cache.json").is_file() and not (second / "upcycled").exists()
            console = r.stdout + r.stderr
        r = _run(tiny_run / "recipe.yaml", "--output_dir", second, *WSD, "--continuation_warmup_steps", ramp)
        assert r.returncode == 0, r.stderr[-4000:]
        console += r.stdout + r.stderr
        assert "the student is built from" in console
        cont = _history(second)
        assert [h["step"] for h in cont] == [h["step"] for h in hist]
        # the rate logged at step s is the one it trained with: ramped by (s - 6) / 3 after step 6
        expected = [lr * min(1.0, (h["step"] - 6) / ramp) if ramp and h["step"] > 6 else lr for lr, h in zip(lrs, hist)]
        assert [h["learning_rate"] for h in cont] == pytest.approx(expected, rel=1e-6)
        assert (f"ramped up from {lrs[6] / 3:.3g} over 3 steps" in console) == bool(ramp)
        # step 7: the same batch on the same weights (rounded to bf16: close)
        assert abs(cont[6]["loss"] - hist[6]["loss"]) < (1e-6 if kind != "weights_bf16" else 1e-2 * hist[6]["loss"])
        a, b = load_file(full / "model.safetensors"), load_file(second / "model.safetensors")
        if weights_only:
            assert "weights-only checkpoint: training continues at step 6" in console
            assert any(not torch.equal(a[k], b[k]) for k in a)  # fresh Adam moments: close, not equal
            assert abs(cont[-1]["loss"] - hist[-1]["loss"]) < 0.2 * hist[-1]["loss"]
        else:
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
        assert (second / "kv_cache.json").is_file()


def test_transfer_refuses_damaged_or_missing_parts(tiny_run, tmp_path):
    from train_mla.checkpoint_transfer import main as transfer

    run = tmp_path / "run"
    r = _run(tiny_run / "recipe.yaml", "--output_dir", run, *WSD, "--stop_at_step", 2)
    assert r.returncode == 0, r.stderr[-4000:]
    parts = tmp_path / "parts"
    transfer(["pack", str(run / "checkpoint-2"), str(parts), "--part_mib", "1"])
    with pytest.raises(SystemExit, match="already holds parts"):
        transfer(["pack", str(run / "checkpoint-2"), str(parts)])
    part = sorted(parts.glob("*.part*"))[1]
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=f"part {part} is damaged"):
        transfer(["unpack", str(parts), str(tmp_path / "dest")])
    part.unlink()
    with pytest.raises(SystemExit, match="is missing"):
        transfer(["unpack", str(parts), str(tmp_path / "dest")])
    assert not (tmp_path / "dest").exists()
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        transfer(["pack", str(run / "upcycled"), str(tmp_path / "p2")])
