"""Stage-1 KL against training tokens, from the trainer_state.json of distillation runs.

python benchmarks/plot_kl.py RUN_DIR[:label] ... --tokens_per_step 32768 --output runs/kl_curve.png
"""

import argparse
import json
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output_dir (or its trainer_state.json), optionally :label")
    p.add_argument("--tokens_per_step", type=int, required=True, help="batch x sequence length x processes")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in a.runs:
        path, _, label = spec.partition(":")
        f = Path(path) if path.endswith(".json") else Path(path) / "trainer_state.json"
        hist = [h for h in json.loads(f.read_text())["log_history"] if "kl" in h]
        ax.plot([h["step"] * a.tokens_per_step / 1e6 for h in hist], [h["kl"] for h in hist], label=label or path)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("KL(teacher || student) per token")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Stage-1 distillation")
    fig.tight_layout()
    fig.savefig(a.output, dpi=120)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
