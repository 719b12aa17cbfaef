"""eval.sh on a tiny MLA checkpoint and its Llama source with the offline tasks, and the summary command."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, make_tiny_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    src = make_tiny_checkpoint(root / "llama")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train_mla.upcycle",
            "--model_name_or_path",
            str(src),
            "--torch_dtype",
            "float32",
            "--q_lora_rank",
            "32",
            "--kv_lora_rank",
            "16",
            "--qk_rope_head_dim",
            "8",
            "--output",
            str(root / "mla"),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [
            "bash",
            str(REPO / "eval.sh"),
            str(root / "mla"),
            str(root / "llama"),
            "--tasks",
            "offline",
            "--limit",
            "6",
            "--dtype",
            "float32",
            "--batch_size",
            "4",
        ],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def test_results_exist_and_metrics_are_in_range(evaluated):
    for name in ("mla", "llama"):
        res = json.loads((evaluated / name / "eval" / "results.json").read_text())
        assert (evaluated / name / "eval" / "results.md").is_file()
        choice, ppl = res["results"]["sharegpt_reply_choice"], res["results"]["sharegpt_ppl"]
        assert 0 <= choice["acc,none"] <= 1 and 0 <= choice["acc_norm,none"] <= 1
        assert ppl["bits_per_byte,none"] > 0 and ppl["byte_perplexity,none"] > 1
    mla = json.loads((evaluated / "mla" / "eval" / "results.json").read_text())
    assert mla["kv_cache"]["kv_ratio"] == pytest.approx(24 / 64)


def test_source_score_equals_lm_eval_hf_model(evaluated):
    """eval.sh must give exactly what lm-eval's own `hf` model gives for the same checkpoint."""
    out = evaluated / "direct"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={evaluated / 'llama'},dtype=float32",
            "--tasks",
            "sharegpt_reply_choice,sharegpt_ppl",
            "--include_path",
            str(REPO / "eval_tasks" / "offline"),
            "--limit",
            "6",
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    direct = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    ours = json.loads((evaluated / "llama" / "eval" / "results.json").read_text())["results"]
    for task, key in [
        ("sharegpt_reply_choice", "acc,none"),
        ("sharegpt_reply_choice", "acc_norm,none"),
        ("sharegpt_ppl", "word_perplexity,none"),
        ("sharegpt_ppl", "bits_per_byte,none"),
    ]:
        assert ours[task][key] == pytest.approx(direct[task][key], rel=1e-6)


def test_summary_builds_table_and_plot(evaluated):
    out = evaluated / "summary" / "s"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train_mla.summarize",
            str(evaluated / "llama"),
            str(evaluated / "mla"),
            "--labels",
            "original,converted",
            "--output",
            str(out),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.with_suffix(".md").read_text()
    assert "| original | 384 | 100 % |" in md and "| converted | 144 | 37.5 % |" in md
    assert out.with_suffix(".png").stat().st_size > 5000
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert all(0 <= r["average"] <= 100 for r in rows)


def test_eval_sh_fails_fast_on_bad_input(tmp_path):
    r = subprocess.run(
        ["bash", str(REPO / "eval.sh"), str(tmp_path / "missing")], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = subprocess.run(["bash", str(REPO / "eval.sh"), "--tasks", "offline"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    r = subprocess.run(
        ["bash", str(REPO / "eval.sh"), str(empty), "--tasks", "offline"], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 2 and "holds no complete model (no .safetensors weights)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_second_evaluation_keeps_the_first(tmp_path):
    from train_mla.evaluate import write_results

    first = {"results": {"t": {"acc,none": 0.5}}, "checkpoint": "a"}
    write_results(tmp_path, first)
    write_results(tmp_path, {"results": {"t": {"acc,none": 0.7}}, "checkpoint": "a"})
    assert json.loads((tmp_path / "results.json").read_text())["results"]["t"]["acc,none"] == 0.7
    kept = sorted(tmp_path.glob("results.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == first and kept[0].with_suffix(".md").is_file()
    assert not list(tmp_path.glob(".*.tmp"))
