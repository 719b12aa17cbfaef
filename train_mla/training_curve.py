"""Quality against training tokens, from a stage-1 run's own evaluations (eval_ppl and eval_kl in its log history).

    python -m train_mla.training_curve RUN_DIR_OR_TRAINER_STATE [--tokens_per_step N] [--reference_ppl P]
                                       [--label TEXT] [--output docs/curve]

RUN_DIR is a stage-1 output folder (its trainer_state.json, or the newest checkpoint-N/trainer_state.json of a run
that has not finished). --tokens_per_step (batch x sequence length x processes x accumulation) puts training tokens
on the x axis instead of steps; --reference_ppl draws the teacher's perplexity on the same evaluation data.
Writes OUTPUT.md (the points), OUTPUT.json and OUTPUT.png (perplexity, and the KL on evaluation and training data,
against tokens).
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
    pts = [{k: h[k] for k in ("step", "eval_ppl", "eval_kl", "eval_ce") if k in h}
           for h in state["log_history"] if "eval_ppl" in h]
    return sorted({p["step"]: p for p in pts}.values(), key=lambda p: p["step"])


def table(points: list[dict], tokens_per_step: int | None, reference_ppl: float | None) -> str:
    head = ["step"] + (["training tokens (M)"] if tokens_per_step else []) + ["eval ppl", "eval KL"]
    head += ["ppl vs reference"] if reference_ppl else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in points:
        cells = [str(p["step"])] + ([f"{p['step'] * tokens_per_step / 1e6:.1f}"] if tokens_per_step else [])
        cells += [f"{p['eval_ppl']:.2f}", f"{p.get('eval_kl', float('nan')):.4f}"]
        cells += [f"{100 * (p['eval_ppl'] / reference_ppl - 1):+.1f} %"] if reference_ppl else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_points(state: dict) -> list[dict]:
    """[{step, kl}] of the training logs (the KL on the training batches, each a mean over its logging window)."""
    return [{"step": h["step"], "kl": h["kl"]} for h in state["log_history"] if "kl" in h and "loss" in h]


def plot(points: list[dict], train: list[dict], path: Path, tokens_per_step: int | None, reference_ppl: float | None,
         label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def plain(v, _):  # 1, 2, 3, 5 of each decade: enough to read a log axis, never crowded
        lead = f"{v:.0e}"[0]
        return f"{v:,.3g}" if lead in "1235" else ""

    plain = FuncFormatter(plain)
    scale = (tokens_per_step / 1e6) if tokens_per_step else 1
    x = [p["step"] * scale for p in points]
    xlabel = "training tokens (millions)" if tokens_per_step else "training step"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [p["eval_ppl"] for p in points], "o-", label=label)
    if reference_ppl:
        a.axhline(reference_ppl, color="gray", ls="--", label=f"teacher ({reference_ppl:.1f})")
    a.set_yscale("log")
    a.set_xlabel(xlabel)
    a.set_ylabel("token perplexity (log scale)")
    a.set_title("evaluation perplexity")
    a.legend(fontsize=8)
    b.plot(x, [p.get("eval_kl", float("nan")) for p in points], "o-", color="C1", label="evaluation data")
    if train:
        b.plot([t["step"] * scale for t in train], [t["kl"] for t in train], "-", color="C2", lw=1, alpha=0.7,
               label="training batches")
    b.set_yscale("log")
    b.legend(fontsize=8)
    b.set_xlabel(xlabel)
    b.set_ylabel("KL(teacher || student), nats/token")
    b.set_title("KL to the teacher")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="stage-1 output folder or a trainer_state.json")
    p.add_argument("--tokens_per_step", type=int, default=None)
    p.add_argument("--reference_ppl", type=float, default=None)
    p.add_argument("--label", default="MLA student")
    p.add_argument("--output", default=None, help="OUTPUT.md/.json/.png (default RUN/training_curve)")
    a = p.parse_args(argv)
    state_file = trainer_state(a.run)
    state = json.loads(state_file.read_text())
    points = eval_points(state)
    if not points:
        raise SystemExit(f"error: {state_file} has no evaluation with eval_ppl (was eval_strategy 'no'?)")
    out = Path(a.output) if a.output else state_file.parent / "training_curve"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(points, a.tokens_per_step, a.reference_ppl)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(json.dumps({"source": str(state_file), "tokens_per_step": a.tokens_per_step,
                                                    "reference_ppl": a.reference_ppl, "points": points}, indent=2) + "\n")
    plot(points, train_points(state), out.with_suffix(".png"), a.tokens_per_step, a.reference_ppl, a.label)
    print(md)
    print(f"wrote {out}.md, .json, .png")


if __name__ == "__main__":
    main()
