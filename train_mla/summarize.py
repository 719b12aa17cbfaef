"""One table (and a plot) across evaluated checkpoints: task scores, their average, KV bytes per token, compression.

    python -m train_mla.summarize CKPT_OR_RESULTS [...] [--labels a,b,...] [--output runs/summary]

Each argument is a checkpoint directory (its eval/results.json is read) or a results.json file; the rows are
assumed to share one GQA source (rows without a kv_cache record are that source). Accuracy-type
metrics (acc_norm when the task has it, else acc) are shown; the average is the one docs/results.md and the README
quote, over ARC-Easy, LAMBADA and SIQA when the results have them (else over every accuracy task), and its column
says which; perplexities are shown but not averaged.
Scores carry lm-eval's standard error and the number of items; --note labels the table and the plot (run_default.sh
says there whether the run was a CPU demonstration). Writes OUTPUT.md, OUTPUT.json and OUTPUT.png (average score
against KV bytes per token, the paper's Figure 1 style, beside the perplexities).
"""

import argparse
import json
from pathlib import Path

PPL_KEYS = ("word_perplexity", "perplexity")
AVERAGED = ("arc_easy_local", "lambada_local", "siqa_local")  # the headline average of the offline evaluation


def averaged_tasks(tasks) -> list[str]:
    """The tasks the average is taken over: the headline three when all are there, else every task given."""
    tasks = sorted(tasks)
    return list(AVERAGED) if all(t in tasks for t in AVERAGED) else tasks


def load(path: str) -> dict:
    p = Path(path)
    f = p / "eval" / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise SystemExit(f"error: no results at {f} (run bash eval.sh {path} first)")
    return json.loads(f.read_text())


def row(res: dict, label: str) -> dict:
    scores, stderr, n, ppl, ppl_metric = {}, {}, {}, {}, {}
    counts = res.get("n-samples", {})
    for task, m in sorted(res["results"].items()):
        for key in ("acc_norm", "acc"):
            if f"{key},none" in m:
                scores[task] = 100 * m[f"{key},none"]
                se = m.get(f"{key}_stderr,none")
                if isinstance(se, (int, float)):
                    stderr[task] = 100 * se
                break
        for key in PPL_KEYS:
            if f"{key},none" in m:
                ppl[task], ppl_metric[task] = m[f"{key},none"], key.replace("_", " ")
                break
        if task in counts:
            n[task] = counts[task].get("effective", counts[task].get("original"))
    kv = res.get("kv_cache")  # MLA checkpoints carry their kv_cache.json; a GQA source has none
    mla_bytes, src_bytes = (kv["mla_bytes_per_token"], kv["source_bytes_per_token"]) if kv else (None, None)
    return {
        "label": label,
        "scores": scores,
        "stderr": stderr,
        "n": n,
        "perplexity": ppl,
        "perplexity_metric": ppl_metric,
        "average": sum(scores[t] for t in averaged_tasks(scores)) / len(averaged_tasks(scores)) if scores else None,
        "kv_bytes_per_token": mla_bytes,
        "source_kv_bytes_per_token": src_bytes,
    }


def table(rows: list[dict], note: str | None = None) -> str:
    """Markdown: a score column per task (value ± standard error), the average when there are several, then the
    perplexities; below it the number of items per task."""
    tasks = sorted({t for r in rows for t in r["scores"]})
    ppl_tasks = sorted({t for r in rows for t in r["perplexity"]})
    metric = {t: next(r["perplexity_metric"][t] for r in rows if t in r["perplexity"]) for t in ppl_tasks}
    with_avg = len(tasks) > 1
    avg_of = averaged_tasks(tasks)
    head = ["model", "KV bytes/token", "KV vs source"] + tasks
    head += [f"avg of {len(avg_of)}" if avg_of != tasks else "avg"] if with_avg else []
    head += [f"{t} ({metric[t]})" for t in ppl_tasks]
    lines = ([f"**{note}**", ""] if note else []) + [
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    for r in rows:
        kv, src = r["kv_bytes_per_token"], r["source_kv_bytes_per_token"]
        cells = [
            r["label"],
            f"{kv:,}" if kv else (f"{src:,}" if src else "-"),
            f"{100 * kv / src:.1f} %" if kv and src else "100 %",
        ]
        cells += [
            (f"{r['scores'][t]:.2f}" + (f" ± {r['stderr'][t]:.2f}" if t in r["stderr"] else ""))
            if t in r["scores"]
            else "-"
            for t in tasks
        ]
        if with_avg:
            cells += [f"{r['average']:.2f}" if r["average"] is not None else "-"]
        cells += [f"{r['perplexity'][t]:,.2f}" if t in r["perplexity"] else "-" for t in ppl_tasks]
        lines.append("| " + " | ".join(cells) + " |")
    n = {t: next((r["n"][t] for r in rows if t in r["n"]), None) for t in tasks + ppl_tasks}
    lines += [
        "",
        "Scores: acc_norm where the task has it, else acc, in %, ± one standard error (lm-eval's)"
        + (f"; the average is over {', '.join(avg_of)}" if with_avg else "")
        + ". Items per task: "
        + ", ".join(f"{t} {v:,}" for t, v in n.items() if v)
        + ".",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, note: str | None = None) -> None:
    """Left: average score (one task: that score) against KV bytes per token, one colour per model, named in the
    legend (labels never overprint). Right: each model's perplexity on WikiText-2 (else ShareGPT, else the first
    perplexity task), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    def compact(v, _=None):  # log-axis ticks that never overprint: 10, 1k, 100k, 10M
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if v >= div:
                return f"{v / div:g}{suffix}"
        return f"{v:g}"

    tasks = sorted({t for r in rows for t in r["scores"]})
    ppl_tasks = sorted({t for r in rows for t in r["perplexity"]})
    ppl_task = next(
        (t for t in ("wikitext2_local", "sharegpt_ppl") if t in ppl_tasks), ppl_tasks[0] if ppl_tasks else None
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    same = {}  # models of one cache size sit side by side, not on top of each other
    for r in rows:
        same.setdefault(r["kv_bytes_per_token"] or r["source_kv_bytes_per_token"], []).append(r["label"])
    for i, r in enumerate(rows):
        is_source = r["kv_bytes_per_token"] is None
        kv = r["source_kv_bytes_per_token"] if is_source else r["kv_bytes_per_token"]
        if r["average"] is None or kv is None:
            continue
        group = same[kv]
        kv = kv * 1.08 ** (group.index(r["label"]) - (len(group) - 1) / 2)
        se = r["stderr"][tasks[0]] if len(tasks) == 1 and tasks[0] in r["stderr"] else None
        a.errorbar(
            [kv],
            [r["average"]],
            yerr=[se] if se else None,
            fmt="*" if is_source else "o",
            ms=14 if is_source else 8,
            capsize=4,
            color=f"C{i}",
            label=r["label"],
            alpha=0.9,
            zorder=3 - 0.1 * i,
        )
        if is_source:
            a.axhline(r["average"], linestyle="--", color="gray", linewidth=1)
    kvs = sorted(
        {
            r["kv_bytes_per_token"] or r["source_kv_bytes_per_token"]
            for r in rows
            if (r["kv_bytes_per_token"] or r["source_kv_bytes_per_token"])
        }
    )
    a.set_xscale("log")
    if kvs:
        a.set_xticks(kvs)
        a.set_xlim(kvs[0] / 1.6, kvs[-1] * 1.6)
    a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    a.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    a.set_xlabel("KV cache bytes per token (all layers, bf16)")
    a.set_ylabel("average score (%)" if len(tasks) > 1 else f"{tasks[0]} (%)" if tasks else "score")
    a.set_title("Score against KV-cache size")
    a.legend(fontsize=8, loc="best")
    a.grid(alpha=0.3)
    if ppl_task:
        have = [(i, r) for i, r in enumerate(rows) if ppl_task in r["perplexity"]]
        b.barh(
            [r["label"] for _, r in have][::-1],
            [r["perplexity"][ppl_task] for _, r in have][::-1],
            color=[f"C{i}" for i, _ in have][::-1],
        )
        for y, (_, r) in enumerate(have[::-1]):
            b.annotate(
                f"{r['perplexity'][ppl_task]:,.1f}",
                (r["perplexity"][ppl_task], y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        vals = [r["perplexity"][ppl_task] for _, r in have]
        b.set_xscale("log")
        b.set_xlim(min(vals) / 3, max(vals) * 3)
        b.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
        b.xaxis.set_major_formatter(FuncFormatter(compact))
        b.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        b.set_xlabel(f"{ppl_task} {have[0][1]['perplexity_metric'][ppl_task]} (log, lower = better)")
        b.set_title("Perplexity")
        b.tick_params(axis="y", labelsize=8)
        b.grid(alpha=0.3, axis="x")
    else:
        b.axis("off")
    if note:
        fig.suptitle(note, fontsize=10, color="darkred")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long axis labels stay inside
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="checkpoint dirs (with eval/results.json) or results.json files")
    p.add_argument("--labels", default=None, help="comma list, one per result (default: the checkpoint names)")
    p.add_argument("--output", default="eval_summary", help="path prefix for .md, .json and .png")
    p.add_argument("--note", default=None, help="a line above the table and over the plot (e.g. what the run was)")
    a = p.parse_args(argv)
    results = [load(r) for r in a.results]
    labels = (
        a.labels.split(",") if a.labels else [Path(r.get("checkpoint", f)).name for r, f in zip(results, a.results)]
    )
    if len(labels) != len(results):
        raise SystemExit(f"error: {len(labels)} labels for {len(results)} results")
    rows = [row(r, lab) for r, lab in zip(results, labels)]
    src = next((r["source_kv_bytes_per_token"] for r in rows if r["source_kv_bytes_per_token"]), None)
    for r in rows:  # rows without a KV record are GQA models: the source of the MLA rows (one source per table)
        if r["source_kv_bytes_per_token"] is None:
            r["source_kv_bytes_per_token"] = src
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(rows, a.note)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"note": a.note, "rows": rows, "source_kv_bytes_per_token": src}, indent=2) + "\n"
    )
    plot(rows, out.with_suffix(".png"), a.note)
    print(md)
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
