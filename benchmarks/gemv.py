"""The batch-1 decode step's matrix-vector products: cuBLAS (F.linear) against the Triton GEMV of
train_mla/inference/gemv.py, on the weights the engine multiplies per step for the Llama-3.2-1B MLA shape
(`llama3.2_1B/mla_kv_rank_64_8bt.yaml`, random weights, bf16).

    python benchmarks/gemv.py                 # GPU: prints a table, writes runs/benchmarks/gemv.{json,md}
    python benchmarks/gemv.py --rows 1 2 4    # also at 2 and 4 rows (batch 2, 4)
    TRITON_INTERPRET=1 python benchmarks/gemv.py --smoke --out /tmp/g   # tiny shapes on CPU: checks the script

The weights are taken from the engine itself (its merged q_a | kv_a, the folded query and output projections, the
merged gate | up, down_proj, the tied LM head), so the shapes are the step's. Each product is one call captured as a
CUDA graph, median of 20 replays (as decode_kernel_sweep.py); bandwidth = weight bytes / time. For the Triton kernel
a grid of tiles is swept per shape and the best is reported with its tile; every result is checked against cuBLAS.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_kernel_sweep import bench  # noqa: E402
from shapes import LLAMA_1B, MLA_1B, MLA_TINY, TINY, config  # noqa: E402

from train_mla.inference.engine import Engine  # noqa: E402
from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM  # noqa: E402

GRID = [
    dict(block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=3)
    for n, k, s, w in itertools.product([4, 8, 16], [256, 512], [1, 2, 4, 8], [4, 8])
]


def step_weights(device, smoke: bool = False) -> dict[str, torch.Tensor]:
    """The weights of one decode step's matrix products, per kind (layer 0's; every layer has the same shapes)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaMLAForCausalLM(config(TINY, MLA_TINY) if smoke else config(LLAMA_1B, MLA_1B))
    model = model.to(torch.bfloat16)
    engine = Engine(model, 1, 64, cuda_graphs=False, attention_backend="torch")
    cache, mlp = engine.caches[0], engine.mlps[0]
    weights = {
        "q_a + kv_a": cache.w_in,
        "query (W_uk folded)": cache.w_q,
        "output (W_uv folded)": cache.w_o,
        "gate + up": mlp.weight,
        "down": model.model.layers[0].mlp.down_proj.weight,
        "lm_head": model.lm_head.weight,
    }
    return {k: w.contiguous() for k, w in weights.items() if w is not None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", type=int, default=[1], help="rows of x (the batch size)")
    p.add_argument("--out", default="runs/benchmarks/gemv")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and tiles, on CPU under TRITON_INTERPRET=1")
    a = p.parse_args(argv)
    if not (torch.cuda.is_available() or a.smoke):
        raise SystemExit("benchmarks/gemv.py times GPU kernels; it needs a CUDA device.")
    from train_mla.inference.gemv import GEMV_TILE, gemv

    dev = torch.device("cpu" if a.smoke else "cuda")
    timer = wall_time if a.smoke else bench
    grid = [dict(block_n=32, block_k=32, split_k=s, num_warps=4, num_stages=3) for s in (1, 2)] if a.smoke else GRID
    rows = []
    for (name, w), m in itertools.product(step_weights(dev, a.smoke).items(), a.rows):
        x = torch.randn(m, w.shape[1], device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, w).float()
        nbytes = w.numel() * w.element_size()
        t_cublas = timer(lambda x=x, w=w: F.linear(x, w))
        best, tried = None, []
        for tile in grid:
            try:
                err = float((gemv(x, w, tile=tile).float() - ref).abs().max() / ref.abs().max())
                t = timer(lambda x=x, w=w, tile=tile: gemv(x, w, tile=tile))
            except Exception as e:  # noqa: BLE001  (a tile that does not build is skipped, and said)
                print(f"{name} rows {m} {tile}: failed: {str(e)[-200:]}", flush=True)
                continue
            tried.append({**tile, "us": 1e6 * t, "max_rel_err": err})
            if err < 1e-2 and (best is None or t < best[0]):
                best = (t, tile, err)
        row = {
            "weight": name,
            "shape": list(w.shape),
            "rows": m,
            "mb": nbytes / 1e6,
            "cublas_us": 1e6 * t_cublas,
            "cublas_tb_per_s": nbytes / t_cublas / 1e12,
        }
        if best:
            row.update(
                triton_us=1e6 * best[0], triton_tb_per_s=nbytes / best[0] / 1e12, tile=best[1], max_rel_err=best[2]
            )
        default = next((t["us"] for t in tried if all(t[k] == v for k, v in GEMV_TILE.items())), None)
        row.update(default_tile_us=default, tiles=tried)  # GEMV_TILE's time (when the grid holds it), every tile's
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tiles"}), flush=True)
        save(a.out, rows)
    print(table(rows))


def wall_time(fn, reps=3):
    """--smoke's timer (CPU): median wall time of a few calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"


def table(rows) -> str:
    out = [
        f"device: {device_name()}",
        "",
        "| weight | shape | rows | MB | cuBLAS us (TB/s) | Triton GEMV us (TB/s) | its tile (n, k, split, warps) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        tri = f"{r['triton_us']:.1f} ({r['triton_tb_per_s']:.2f})" if "triton_us" in r else "-"
        tile = r.get("tile") or {}
        tile_s = ", ".join(str(tile.get(k)) for k in ("block_n", "block_k", "split_k", "num_warps")) if tile else "-"
        out.append(
            f"| {r['weight']} | {r['shape'][0]} x {r['shape'][1]} | {r['rows']} | {r['mb']:.1f} | "
            f"{r['cublas_us']:.1f} ({r['cublas_tb_per_s']:.2f}) | {tri} | {tile_s} |"
        )
    return "\n".join(out)


def save(out, rows):
    """After every weight, so that a run cut short keeps what it measured."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"device": device_name(), "rows": rows}, indent=2) + "\n")
    Path(out + ".md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
