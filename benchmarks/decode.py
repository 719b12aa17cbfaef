"""Decode speed of the generation engine: a Llama-3.2-1B-shaped GQA model against its MLA version (kv_lora_rank 64
+ rope 32), both with random weights (speed does not depend on them), in the same engine.

    python benchmarks/decode.py                       # the issue's grid on one GPU, writes runs/benchmarks/decode.*
    python benchmarks/decode.py --smoke --out /tmp/x  # tiny shapes on CPU: checks that the script runs
    python benchmarks/decode.py --compile --attention_backend tilelang   # MLA layers by the TileLang kernel (Hopper)

For every (batch, context): B random prompts of `context` tokens are prefilled for real, then --steps greedy decode
steps are timed. Reported: decode tokens/s, step latency, cache bytes (allocated, and used at that context), and
the fraction of the HBM bound, i.e. (weight bytes + cache bytes one step must read) / copy bandwidth measured in
this run, divided by the measured step time. Also: transformers' `generate` at two points, and the largest batch
whose weights + cache fit a fixed memory budget at 32k context (its cache rows are filled by prefilling one 32k
prompt and copying it into every slot, then decoded and timed like the rest).
"""

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import LLAMA_1B, MLA_1B, MLA_TINY, TINY, config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from train_mla.inference import triton_decode as tk  # noqa: E402
from train_mla.inference.engine import Engine  # noqa: E402
from train_mla.model.kv_cache_size import kv_cache_table  # noqa: E402
from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM  # noqa: E402


def build_models(smoke: bool, device, dtype):
    src_cfg = config(TINY if smoke else LLAMA_1B)
    mla_cfg = config(TINY if smoke else LLAMA_1B, MLA_TINY if smoke else MLA_1B)
    torch.manual_seed(0)
    with torch.device(device):
        models = {
            "GQA (Llama-3.2-1B shape)": LlamaForCausalLM(src_cfg),
            "MLA kv 64 + rope 32": LlamaMLAForCausalLM(mla_cfg),
        }
    return {k: m.to(dtype).eval() for k, m in models.items()}, kv_cache_table(src_cfg, mla_cfg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, gib: float) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 10."""
    n = int(gib * 2**30) // 2
    a, b = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    best = math.inf
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * n * 2 / best


def weight_bytes(model) -> int:
    """Bytes one decode step reads from the weights: every parameter once (the embedding table is read in full
    by the tied LM head; an untied input embedding would only read B rows, so it is left out)."""
    params = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def time_decode(engine, logits, positions, steps, device):
    tokens = logits.argmax(-1)
    for _ in range(3):  # warm-up: CUDA-graph capture (and compilation) for this batch size
        logits = engine.decode(tokens, positions)
        positions = positions + 1
        tokens = logits.argmax(-1)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        logits = engine.decode(tokens, positions)
        positions = positions + 1
        tokens = logits.argmax(-1)
    sync(device)
    return (time.perf_counter() - t) / steps, positions


def run_point(model, name, batch, context, args, device, bandwidth, replicate=False):
    engine = Engine(
        model,
        max_batch_size=batch,
        max_seq_len=context + args.steps + 8,
        compile=args.compile,
        prefill_tokens=args.prefill_tokens,
        attention_backend=args.attention_backend,
    )
    g = torch.Generator().manual_seed(batch * 100003 + context)
    vocab = model.config.vocab_size
    sync(device)
    t = time.perf_counter()
    if replicate:  # one real 32k prompt copied into every slot (prefilling hundreds of 32k prompts is not the point)
        logits = engine.prefill([torch.randint(0, vocab, (context,), generator=g).tolist()], [0])
        for cache in engine.caches:
            for tensor in cache.tensors():
                tensor[1:] = tensor[:1]
        logits = logits.expand(batch, -1)
    else:
        logits = engine.prefill(
            [torch.randint(0, vocab, (context,), generator=g).tolist() for _ in range(batch)], list(range(batch))
        )
    sync(device)
    prefill_s = time.perf_counter() - t
    step_s, positions = time_decode(engine, logits, torch.full((batch,), context, device=device), args.steps, device)
    bpt = engine.cache_bytes_per_token()
    mean_len = context + 3 + (args.steps + 1) / 2  # average attended length over the timed steps
    read = weight_bytes(model) + batch * mean_len * bpt
    row = {
        "model": name,
        "batch": batch,
        "context": context,
        "decode_tokens_per_s": batch / step_s,
        "step_ms": 1e3 * step_s,
        "prefill_s": prefill_s,
        "prefilled": "replicated" if replicate else "real",
        "cache_bytes_per_token": bpt,
        "cache_bytes_used": batch * context * bpt,
        "cache_bytes_allocated": bpt * engine.max_batch_size * engine.max_seq_len,
        "bytes_read_per_step": read,
        "hbm_bound_fraction": read / bandwidth / step_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    del engine, logits
    gc.collect()  # free the engine's cache and CUDA-graph pool before the next point allocates its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def hf_generate(model, name, batch, context, steps, device):
    """transformers' own generate (DynamicCache, the model's absorbed decode for MLA): decode time only."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=None)

    def run(n):
        sync(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, **kw)
        sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up
    only_prefill, full = run(1), run(steps + 1)
    step_s = (full - only_prefill) / steps
    return {
        "model": name,
        "batch": batch,
        "context": context,
        "decode_tokens_per_s": batch / step_s,
        "step_ms": 1e3 * step_s,
    }


def check_engine(models, device, dtype, backend="auto"):
    """Max |logit| difference: engine (graphs + kernel) vs the plain PyTorch path vs the model's full forward."""
    out = {}
    for name, model in models.items():
        prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (37, 5)]
        fast = Engine(model, 2, 64, attention_backend=backend)
        plain = Engine(model, 2, 64, cuda_graphs=False, attention_backend="torch")
        logits = [e.prefill(prompts, [0, 1]) for e in (fast, plain)]
        tokens, positions = logits[0].argmax(-1), torch.tensor([37, 5], device=device)
        a, b = fast.decode(tokens, positions).clone(), plain.decode(tokens, positions)
        with torch.no_grad():
            full = torch.stack(
                [
                    model(torch.tensor([p + [int(t)]], device=device)).logits[0, -1].float()
                    for p, t in zip(prompts, tokens)
                ]
            )
        out[name] = {
            "engine_vs_plain": float((a - b).abs().max()),
            "engine_vs_full_forward": float((a - full).abs().max()),
            "logit_scale": float(full.abs().max()),
            "dtype": str(dtype),
        }
    return out


def best_tiles(path: str, point: str | None = None) -> dict:
    """{layout: tile} from a benchmarks/decode_kernel_sweep.py output. Its "best" is keyed by layout ("mla") when
    the sweep measured one point and by layout and point ("mla 64x8192") when it measured several: then `point`
    chooses, and without it a layout with several best tiles is an error rather than a silent pick."""
    best = json.loads(Path(path).read_text())["best"]
    chosen: dict[str, dict] = {}
    for name, row in best.items():
        layout, _, at = name.partition(" ")
        if point and at and at != point:
            continue
        if layout in chosen:
            points = sorted(n.partition(" ")[2] for n in best if n.partition(" ")[0] == layout)
            raise SystemExit(f"{path}: best {layout} tiles at several points ({', '.join(points)}): pass --tiles_point")
        chosen[layout] = {k: row.get(k, tk.TILE[layout][k]) for k in tk.TILE[layout]}
    if not chosen:
        raise SystemExit(f"{path}: no best tile" + (f" at {point}" if point else ""))
    return chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--grid",
        nargs="*",
        default=["1x1024", "64x1024", "64x8192", "16x32768", "4x131072"],
        help="batch x context points",
    )
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step before graph capture")
    p.add_argument(
        "--budget_gib",
        type=float,
        default=80.0,
        help="memory budget for the largest-batch-at-32k point (0: skip that point)",
    )
    p.add_argument("--hf_points", nargs="*", default=["1x1024", "64x8192"])
    p.add_argument("--prefill_tokens", type=int, default=65536)
    p.add_argument("--models", nargs="*", default=["GQA", "MLA"], help="which models to run (name prefixes)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU is fine): only checks the script")
    p.add_argument("--out", default="runs/benchmarks/decode")
    p.add_argument("--tiles", help="a benchmarks/decode_kernel_sweep.py output: run the kernel with its best tiles")
    p.add_argument(
        "--attention_backend",
        default="auto",
        choices=["auto", "triton", "tilelang"],
        help="tilelang: MLA layers through the TileLang kernel (Hopper, the [tilelang] extra); GQA layers stay Triton",
    )
    p.add_argument("--tiles_point", help="which of the sweep's points (e.g. 64x8192) to take, when it measured several")
    a = p.parse_args(argv)
    if a.tiles:
        tk.TILE.update(best_tiles(a.tiles, a.tiles_point))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        raise SystemExit("benchmarks/decode.py measures a GPU; on CPU use --smoke.")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.smoke:
        a.grid, a.hf_points, a.steps, a.budget_gib = ["1x16", "3x40"], ["3x40"], 4, 0.002
    grid = [tuple(int(v) for v in g.split("x")) for g in a.grid]
    models, kv = build_models(a.smoke, device, dtype)
    models = {k: m for k, m in models.items() if any(k.startswith(x) for x in a.models)}
    bw = copy_bandwidth(device, 0.01 if a.smoke else 4.0)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "copy_bandwidth_bytes_per_s": bw,
        "weights": "random (speed does not depend on them)",
        "compile": a.compile,
        "steps": a.steps,
        "kv_cache_table": kv,
        "tiles": {k: dict(v) for k, v in tk.TILE.items()},
        "attention_backend": a.attention_backend,
    }
    print(json.dumps(info), flush=True)
    result = {
        "info": info,
        "check": check_engine(models, device, dtype, a.attention_backend),
        "grid": [],
        "hf_generate": [],
        "max_batch_32k": [],
    }
    print(json.dumps(result["check"]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result) + "\n")

    for batch, context in grid:
        for name, model in models.items():
            result["grid"].append(run_point(model, name, batch, context, a, device, bw))
            print(json.dumps(result["grid"][-1]), flush=True)
            save()
    for point in a.hf_points:
        batch, context = (int(v) for v in point.split("x"))
        for name, model in models.items():
            result["hf_generate"].append(hf_generate(model, name, batch, context, min(a.steps, 32), device))
            print(json.dumps(result["hf_generate"][-1]), flush=True)
            save()
    context = 64 if a.smoke else 32768
    budget = a.budget_gib * 2**30
    for name, model in models.items() if budget else ():
        bpt = kv["source_bytes_per_token"] if model.config.model_type == "llama" else kv["mla_bytes_per_token"]
        bpt = bpt * torch.finfo(dtype).bits // 16
        reserve = 2 * 2**30 if not a.smoke else 0  # activations, logits, graph pool
        params = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
        batch = int((budget - params - reserve) // (bpt * (context + a.steps + 8)))
        row = run_point(model, name, batch, context, a, device, bw, replicate=True)
        row["budget_bytes"] = budget
        result["max_batch_32k"].append(row)
        print(json.dumps(row), flush=True)
        save()
    print(markdown(result))


def markdown(r) -> str:
    i = r["info"]
    lines = [
        f"Device: {i['device']}, torch {i['torch']}, {i['dtype']}, weights {i['weights']}; copy bandwidth "
        f"{i['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; {i['steps']} timed decode steps per point; "
        f"torch.compile: {i['compile']}.",
        "",
        "| model | batch | context | decode tok/s | step ms | cache MB (used) | bytes/token | HBM-bound fraction | "
        "prefill s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["grid"]:
        lines.append(
            f"| {x['model']} | {x['batch']} | {x['context']:,} | {x['decode_tokens_per_s']:,.0f} | "
            f"{x['step_ms']:.2f} | "
            f"{x['cache_bytes_used'] / 1e6:,.0f} | {x['cache_bytes_per_token']:,} | {x['hbm_bound_fraction']:.2f} | "
            f"{x['prefill_s']:.1f} |"
        )
    if r["hf_generate"]:
        lines += [
            "",
            "transformers `generate` (same models, DynamicCache):",
            "",
            "| model | batch | context | decode tok/s | step ms | engine speed-up |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for x in r["hf_generate"]:
            eng = next(
                (
                    g
                    for g in r["grid"]
                    if (g["model"], g["batch"], g["context"]) == (x["model"], x["batch"], x["context"])
                ),
                None,
            )
            up = f"{eng['decode_tokens_per_s'] / x['decode_tokens_per_s']:.1f}x" if eng else "-"
            lines.append(
                f"| {x['model']} | {x['batch']} | {x['context']:,} | {x['decode_tokens_per_s']:,.0f} | "
                f"{x['step_ms']:.2f} | {up} |"
            )
    if r["max_batch_32k"]:
        lines += [
            "",
            "Largest batch at 32k context whose weights + cache fit the budget (cache filled by one real prefill "
            "copied into every slot):",
            "",
            "| model | budget GiB | batch | decode tok/s | step ms | peak GiB | HBM-bound fraction |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["max_batch_32k"]:
            peak = f"{x['peak_memory_bytes'] / 2**30:.1f}" if x["peak_memory_bytes"] else "-"
            lines.append(
                f"| {x['model']} | {x['budget_bytes'] / 2**30:.0f} | {x['batch']} | {x['decode_tokens_per_s']:,.0f} | "
                f"{x['step_ms']:.2f} | {peak} | {x['hbm_bound_fraction']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
