"""Plot decode tokens/s against context for both models from benchmarks/decode.py's JSON.

python benchmarks/plot_decode.py runs/benchmarks/decode.json runs/benchmarks/decode.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    r = json.load(open(src))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {}
    for i, model in enumerate(dict.fromkeys(x["model"] for x in r["grid"])):
        pts = sorted((x["context"], x["decode_tokens_per_s"], x["batch"]) for x in r["grid"] if x["model"] == model)
        line = [p for p in pts if p[2] > 1]  # the batch-1 point is drawn alone: it is latency, not throughput
        drawn = ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=f"{model}, batch > 1")
        colors[model] = drawn[0].get_color()
        single = [p for p in pts if p[2] == 1]
        ax.scatter(
            [p[0] for p in single], [p[1] for p in single], marker="x", color=colors[model], label=f"{model}, batch 1"
        )
        below = i % 2 == 0  # the first model's labels under its points, the second's above: they do not overlap
        for c, t, b in pts:
            ax.annotate(
                f"B={b}",
                (c, t),
                textcoords="offset points",
                xytext=(5, -10 if below else 5),
                fontsize=7,
                color=colors[model],
            )
    for x in r.get("max_batch_32k", []):
        color = colors.get(x["model"])
        ax.scatter([x["context"]], [x["decode_tokens_per_s"]], marker="*", s=110, color=color, zorder=3)
        ax.annotate(
            f"max B={x['batch']} in {x['budget_bytes'] / 2**30:.0f} GiB",
            (x["context"], x["decode_tokens_per_s"]),
            textcoords="offset points",
            xytext=(8, -3),
            fontsize=7,
            color=color,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Engine decode, Llama-3.2-1B shape, {r['info']['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
