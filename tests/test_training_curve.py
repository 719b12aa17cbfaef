"""training_curve: the evaluation points of a stage-1 log history, against steps or tokens, from a run or its newest
checkpoint."""

import json

import pytest

from train_mla import training_curve


def _state(evals, train_kl=(0.9, 0.5, 0.2)):
    hist = [{"step": 10 * (i + 1), "loss": k, "kl": k} for i, k in enumerate(train_kl)]
    hist += [{"step": s, "eval_loss": kl, "eval_kl": kl, "eval_ce": 3.0, "eval_ppl": p} for s, p, kl in evals]
    return {"log_history": hist, "global_step": max(s for s, _, _ in evals)}


def test_points_table_and_files(tmp_path):
    state = _state([(250, 34.7, 0.48), (0, 166.7, 1.92), (500, 32.8, 0.43)])
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    training_curve.main(
        [str(tmp_path), "--tokens_per_step", "65536", "--reference_ppl", "25.0", "--output", str(tmp_path / "c")]
    )
    md = (tmp_path / "c.md").read_text().splitlines()
    assert md[0] == "| step | training tokens (M) | eval ppl | eval KL | ppl vs reference |"
    assert md[2] == "| 0 | 0.0 | 166.70 | 1.9200 | +566.8 % |"  # sorted by step
    assert md[4] == "| 500 | 32.8 | 32.80 | 0.4300 | +31.2 % |"  # 500 x 65,536 = 32.8 M tokens
    data = json.loads((tmp_path / "c.json").read_text())
    assert [p["step"] for p in data["runs"][0]["points"]] == [0, 250, 500] and data["reference_ppl"] == 25.0
    assert (tmp_path / "c.png").stat().st_size > 5000
    assert training_curve.train_points(state) == [
        {"step": 10, "kl": 0.9},
        {"step": 20, "kl": 0.5},
        {"step": 30, "kl": 0.2},
    ]


def test_several_runs_share_a_table_and_a_plot(tmp_path):
    for name, ppl in (("full", 35.4), ("frozen", 37.6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(_state([(0, 166.7, 1.92), (350, ppl, 0.5)])))
    training_curve.main([str(tmp_path / "full"), str(tmp_path / "frozen"), "--output", str(tmp_path / "c")])
    md = (tmp_path / "c.md").read_text().splitlines()
    assert md[0] == "| run | step | eval ppl | eval KL |"
    assert md[3] == "| full | 350 | 35.40 | 0.5000 |" and md[5] == "| frozen | 350 | 37.60 | 0.5000 |"  # folder names
    data = json.loads((tmp_path / "c.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["full", "frozen"]
    training_curve.main(
        [str(tmp_path / "full"), str(tmp_path / "frozen"), "--labels", "A, B", "--output", str(tmp_path / "d")]
    )
    assert "| B | 350 | 37.60 | 0.5000 |" in (tmp_path / "d.md").read_text()
    with pytest.raises(SystemExit, match="--labels has 1 names for 2 runs"):
        training_curve.main([str(tmp_path / "full"), str(tmp_path / "frozen"), "--labels", "A"])


def test_unfinished_run_reads_its_newest_checkpoint(tmp_path):
    for step in (9, 10):  # numeric order, not string order
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(_state([(step, 40.0, 0.5)])))
    assert training_curve.trainer_state(str(tmp_path)) == tmp_path / "checkpoint-10" / "trainer_state.json"
    training_curve.main([str(tmp_path)])
    assert "| 10 | 40.00 | 0.5000 |" in (tmp_path / "checkpoint-10" / "training_curve.md").read_text()


def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no trainer_state.json"):
        training_curve.main([str(tmp_path)])
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 1.0, "kl": 1.0}]}))
    with pytest.raises(SystemExit, match="no evaluation with eval_ppl"):
        training_curve.main([str(tmp_path)])
