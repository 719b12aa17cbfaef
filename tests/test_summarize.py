"""summarize: scores with standard errors and item counts, the average only across several tasks, a labelled plot."""

import json

from train_mla import summarize


def _res(acc, se, n, ppl, kv=None):
    res = {
        "results": {
            "arc": {"acc,none": acc, "acc_stderr,none": se, "acc_norm,none": acc + 0.01, "acc_norm_stderr,none": se},
            "wiki": {"word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"},
        },
        "n-samples": {"arc": {"original": n, "effective": n}, "wiki": {"original": 62, "effective": 62}},
    }
    if kv:
        res["kv_cache"] = {"mla_bytes_per_token": kv, "source_bytes_per_token": 400}
    return res


def test_table_has_standard_errors_counts_and_note(tmp_path):
    for name, res in {
        "a": _res(0.5, 0.01, 2376, 38.9),
        "b": _res(0.4, 0.02, 2376, 100.2, kv=100),
        "c": _res(0.3, 0.03, 2376, 200.0, kv=100),
    }.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    summarize.main(
        [str(tmp_path / f"{n}.json") for n in "abc"]
        + ["--labels", "orig,mla,mla2", "--note", "CPU demonstration: 2 steps", "--output", str(tmp_path / "s")]
    )
    md = (tmp_path / "s.md").read_text()
    assert md.startswith("**CPU demonstration: 2 steps**")
    assert "| orig | 400 | 100 % | 51.00 ± 1.00 | 38.90 |" in md  # acc_norm, ± SE in points, no avg for one task
    assert "| mla | 100 | 25.0 % | 41.00 ± 2.00 | 100.20 |" in md
    assert "wiki (word perplexity)" in md and "Items per task: arc 2,376, wiki 62." in md
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows[1]["stderr"]["arc"] == 2.0 and rows[1]["n"]["arc"] == 2376
    assert (tmp_path / "s.png").stat().st_size > 5000


def test_average_column_with_several_tasks():
    res = _res(0.5, 0.01, 10, 10.0)
    res["results"]["siqa"] = {"acc,none": 0.3, "acc_stderr,none": 0.05}
    md = summarize.table([summarize.row(res, "m")])
    assert "| arc | siqa | avg |" in md and "| 51.00 ± 1.00 | 30.00 ± 5.00 | 40.50 |" in md


def test_the_average_is_the_headline_three_whatever_else_was_scored():
    """One definition everywhere: ARC-Easy, LAMBADA, SIQA; a fourth accuracy task is shown but not averaged, and a
    perplexity of millions is printed with separators."""
    res = {
        "results": {
            t: {"acc,none": v}
            for t, v in (
                ("arc_easy_local", 0.5),
                ("lambada_local", 0.2),
                ("siqa_local", 0.4),
                ("sharegpt_reply_choice", 0.9),
            )
        }
    }
    res["results"]["wikitext2_local"] = {"word_perplexity,none": 26056509.888}
    r = summarize.row(res, "m")
    assert abs(r["average"] - (50 + 20 + 40) / 3) < 1e-9
    md = summarize.table([r])
    assert "| avg of 3 |" in md and "| 36.67 | 26,056,509.89 |" in md
    assert "the average is over arc_easy_local, lambada_local, siqa_local" in md
