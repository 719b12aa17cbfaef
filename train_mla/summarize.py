"""One table (and a plot) across evaluated checkpoints: task scores, their average, KV bytes per token, compression.

    python -m train_mla.summarize CKPT_OR_RESULTS [...] [--labels a,b,...] [--output docs/summary]

Each argument is a checkpoint directory (its eval/results.json is read) or a results.json file; the rows are
assumed to share one GQA source (rows without a kv_cache record are that source). Accuracy-type
metrics (acc_norm when the task has it, else acc) are averaged; perplexities are shown but not averaged.
Writes OUTPUT.md, OUTPUT.json and OUTPUT.png (average score against KV bytes per token, the paper's Figure 1 style).
"""

import argparse
import json
from pathlib import Path

PPL_KEYS = ("word_perplexity", "perplexity")


def load(path: str) -> dict:
    p = Path(path)
    f = p / "eval" / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise SystemExit(f"error: no results at {f} (run bash eval.sh {path} first)")
    return json.loads(f.read_text())


def row(res: dict, label: str) -> dict:
    scores, ppl = {}, {}
    for task, m in sorted(res["results"].items()):
        for key in ("acc_norm,none", "acc,none"):
            if key in m:
                scores[task] = 100 * m[key]
                break
        for key in PPL_KEYS:
            if f"{key},none" in m:
                ppl[task] = m[f"{key},none"]
                break
    kv = res.get("kv_cache")  # MLA checkpoints carry their kv_cache.json; a GQA source has none
    mla_bytes, src_bytes = (kv["mla_bytes_per_token"], kv["source_bytes_per_token"]) if kv else (None, None)
    return {"label": label, "scores": scores, "perplexity": ppl,
            "average": sum(scores.values()) / len(scores) if scores else None,
            "kv_bytes_per_token": mla_bytes, "source_kv_bytes_per_token": src_bytes}


def table(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r["scores"]})
    ppl_tasks = sorted({t for r in rows for t in r["perplexity"]})
    head = ["model", "KV bytes/token", "KV vs source"] + tasks + ["avg"] + [f"{t} ppl" for t in ppl_tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        kv, src = r["kv_bytes_per_token"], r["source_kv_bytes_per_token"]
        cells = [r["label"], f"{kv:,}" if kv else (f"{src:,}" if src else "-"),
                 f"{100 * kv / src:.1f} %" if kv and src else "100 %"]
        cells += [f"{r['scores'][t]:.2f}" if t in r["scores"] else "-" for t in tasks]
        cells += [f"{r['average']:.2f}" if r["average"] is not None else "-"]
        cells += [f"{r['perplexity'][t]:.3f}" if t in r["perplexity"] else "-" for t in ppl_tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["average"] is None:
            continue
        is_source = r["kv_bytes_per_token"] is None
        kv = r["source_kv_bytes_per_token"] if is_source else r["kv_bytes_per_token"]
        if kv is None:
            continue
        ax.scatter([kv], [r["average"]], marker="*" if is_source else "o", s=120 if is_source else 50)
        ax.annotate(r["label"], (kv, r["average"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if is_source:
            ax.axhline(r["average"], linestyle="--", color="gray", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes per token (all layers, bf16)")
    ax.set_ylabel("average score (%)")
    ax.set_title("Average score against KV-cache size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="checkpoint dirs (with eval/results.json) or results.json files")
    p.add_argument("--labels", default=None, help="comma list, one per result (default: the checkpoint names)")
    p.add_argument("--output", default="eval_summary", help="path prefix for .md, .json and .png")
    a = p.parse_args(argv)
    results = [load(r) for r in a.results]
    labels = a.labels.split(",") if a.labels else [Path(r.get("checkpoint", f)).name for r, f in zip(results, a.results)]
    if len(labels) != len(results):
        raise SystemExit(f"error: {len(labels)} labels for {len(results)} results")
    rows = [row(r, lab) for r, lab in zip(results, labels)]
    src = next((r["source_kv_bytes_per_token"] for r in rows if r["source_kv_bytes_per_token"]), None)
    for r in rows:  # rows without a KV record are GQA models: the source of the MLA rows (one source per table)
        if r["source_kv_bytes_per_token"] is None:
            r["source_kv_bytes_per_token"] = src
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "source_kv_bytes_per_token": src}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(md)
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
