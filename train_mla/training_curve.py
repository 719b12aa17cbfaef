"""Quality against training tokens, from a stage-1 run's own evaluations (eval_ppl and eval_kl in its log history).

    python -m train_mla.training_curve RUN [RUN ...] [--tokens_per_step N] [--reference_ppl P]
                                       [--labels A,B] [--output runs/curve]

RUN is a stage-1 output folder (its trainer_state.json, or the newest checkpoint-N/trainer_state.json of a run that
has not finished) or a trainer_state.json; several runs (an ablation) share one table and one plot, a colour each.
--tokens_per_step (batch x sequence length x processes x accumulation) puts training tokens on the x axis instead of
steps; --reference_ppl draws the teacher's perplexity on the same evaluation data. Writes OUTPUT.md (the points),
OUTPUT.json and OUTPUT.png (perplexity, and the KL on evaluation and training data, against tokens).
"""

import argparse
import json
from pathlib import Path


def trainer_state(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if (p / "trainer_state.json").is_file():
        return p / "trainer_state.json"
    ckpts = sorted(p.glob("checkpoint-*/trainer_state.json"), key=lambda f: int(f.parent.name.split("-")[-1]))
    if not ckpts:
        raise SystemExit(f"error: no trainer_state.json in {p} or its checkpoint-* folders")
    return ckpts[-1]


def eval_points(state: dict) -> list[dict]:
    """[{step, eval_ppl, eval_kl, eval_ce}] of every evaluation that logged eval_ppl, in step order."""
    pts = [
        {k: h[k] for k in ("step", "eval_ppl", "eval_kl", "eval_ce") if k in h}
        for h in state["log_history"]
        if "eval_ppl" in h
    ]
    return sorted({p["step"]: p for p in pts}.values(), key=lambda p: p["step"])


def table(runs: list[tuple[str, list[dict]]], tokens_per_step: int | None, reference_ppl: float | None) -> str:
    """One row per evaluation; with several runs a first column names the run."""
    several = len(runs) > 1
    head = (["run"] if several else []) + ["step"] + (["training tokens (M)"] if tokens_per_step else [])
    head += ["eval ppl", "eval KL"] + (["ppl vs reference"] if reference_ppl else [])
    lines = ["| " + " | ".join(head) + " |", "|" + ("---|" if several else "") + "---:|" * (len(head) - several)]
    for label, points in runs:
        for p in points:
            cells = ([label] if several else []) + [str(p["step"])]
            cells += [f"{p['step'] * tokens_per_step / 1e6:.1f}"] if tokens_per_step else []
            cells += [f"{p['eval_ppl']:.2f}", f"{p.get('eval_kl', float('nan')):.4f}"]
            cells += [f"{100 * (p['eval_ppl'] / reference_ppl - 1):+.1f} %"] if reference_ppl else []
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_points(state: dict) -> list[dict]:
    """[{step, kl}] of the training logs (the KL on the training batches, each a mean over its logging window)."""
    return [{"step": h["step"], "kl": h["kl"]} for h in state["log_history"] if "kl" in h and "loss" in h]


def plot(
    runs: list[tuple[str, list[dict], list[dict]]], path: Path, tokens_per_step: int | None, reference_ppl: float | None
):
    """runs: (label, evaluation points, training points); one colour per run, the same in both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def plain(v, _):  # 1, 2, 3, 5 of each decade: enough to read a log axis, never crowded
        lead = f"{v:.0e}"[0]
        return f"{v:,.3g}" if lead in "1235" else ""

    plain = FuncFormatter(plain)
    scale = (tokens_per_step / 1e6) if tokens_per_step else 1
    xlabel = "training tokens (millions)" if tokens_per_step else "training step"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, points, train) in enumerate(runs):
        x = [p["step"] * scale for p in points]
        a.plot(x, [p["eval_ppl"] for p in points], "o-", color=f"C{i}", label=label)
        b.plot(
            x,
            [p.get("eval_kl", float("nan")) for p in points],
            "o-",
            color=f"C{i}",
            label=label if len(runs) > 1 else "evaluation data",
        )
        if train:
            b.plot(
                [t["step"] * scale for t in train],
                [t["kl"] for t in train],
                "-",
                color=f"C{i}",
                lw=1,
                alpha=0.4,
                label="_nolegend_" if len(runs) > 1 else "training batches",
            )  # several: the title says it
    if reference_ppl:
        a.axhline(reference_ppl, color="gray", ls="--", label=f"teacher ({reference_ppl:.1f})")
    a.set_yscale("log")
    a.set_xlabel(xlabel)
    a.set_ylabel("token perplexity (log scale)")
    a.set_title("evaluation perplexity")
    a.legend(fontsize=8)
    b.set_yscale("log")
    b.legend(fontsize=7)
    b.set_xlabel(xlabel)
    b.set_ylabel("KL(teacher || student), nats/token")
    b.set_title("KL to the teacher (faint: on training batches)")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="stage-1 output folders or trainer_state.json files (several: one plot)")
    p.add_argument("--tokens_per_step", type=int, default=None)
    p.add_argument("--reference_ppl", type=float, default=None)
    p.add_argument("--labels", default=None, help="comma list, one per run (default: MLA student / the folder names)")
    p.add_argument("--output", default=None, help="OUTPUT.md/.json/.png (default FIRST_RUN/training_curve)")
    a = p.parse_args(argv)
    files = [trainer_state(r) for r in a.runs]
    if a.labels is not None:
        labels = [x.strip() for x in a.labels.split(",")]
        if len(labels) != len(files):
            raise SystemExit(f"error: --labels has {len(labels)} names for {len(files)} runs")
    else:
        labels = (
            ["MLA student"]
            if len(files) == 1
            else [f.parent.name if f.name == "trainer_state.json" else f.stem for f in files]
        )
    runs = []
    for label, f in zip(labels, files):
        state = json.loads(f.read_text())
        points = eval_points(state)
        if not points:
            raise SystemExit(f"error: {f} has no evaluation with eval_ppl (was eval_strategy 'no'?)")
        runs.append((label, f, points, train_points(state)))
    out = Path(a.output) if a.output else files[0].parent / "training_curve"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table([(r[0], r[2]) for r in runs], a.tokens_per_step, a.reference_ppl)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "tokens_per_step": a.tokens_per_step,
                "reference_ppl": a.reference_ppl,
                "runs": [{"label": r[0], "source": str(r[1]), "points": r[2]} for r in runs],
            },
            indent=2,
        )
        + "\n"
    )
    plot([(r[0], r[2], r[3]) for r in runs], out.with_suffix(".png"), a.tokens_per_step, a.reference_ppl)
    print(md)
    print(f"wrote {out}.md, .json, .png")


if __name__ == "__main__":
    main()
