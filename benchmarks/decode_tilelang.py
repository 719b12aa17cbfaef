"""The TileLang latent-cache decode kernel (train_mla/inference/tilelang_decode.py) against the Triton kernel, on one
GPU, at the recipes' widths and DeepSeek's: cache bandwidth of one attention call, per tile of a small grid.

    python benchmarks/decode_tilelang.py                               # 64 x 8k, latent 64 + RoPE 32, 32 heads
    python benchmarks/decode_tilelang.py --points 1x1024 64x8192 16x32768 --shapes 1b deepseek16 deepseek128
    python benchmarks/decode_tilelang.py --default_only --rounds 15    # TILE against Triton's TILE, alternately

Each call (split pass + merge) is one CUDA graph, timed by CUDA events, median of 20 replays (decode_kernel_sweep's
`bench`); every tile's output is checked against the PyTorch reference before it is timed, and a tile whose error
exceeds 0.05 is no candidate. Bandwidth = cache bytes the call must read / its time; `copy` is a device-to-device copy
of the same bytes (read + write counted), the card's practical ceiling. With --rounds R the best TileLang tile and
the Triton kernel's TILE are then timed alternately R times (the card's clock drifts between calls: docs/benchmarks.md).
Writes runs/benchmarks/decode_tilelang.{json,md}.
"""

import argparse
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_kernel_sweep import alternate, bench  # noqa: E402

from train_mla.inference import decode_attention as da  # noqa: E402

SHAPES = {  # query heads, latent, RoPE key
    "1b": (32, 64, 32),  # llama3.2_1B/mla_kv_rank_64_8bt.yaml
    "smollm2_25": (9, 80, 16),  # smollm2_135M/mla_kv_rank_80_rope_16*.yaml
    "deepseek16": (16, 512, 64),  # DeepSeek-V3's 128 heads over 8 GPUs
    "deepseek128": (128, 512, 64),  # DeepSeek-V3's 128 heads on one
}
# per TILE entry: block_h, block_n, num_stages, threads. Every tile here lowers for sm_90a within 227 KB of shared
# memory (tests/test_benchmarks.py, without a GPU) and compiled with nvcc 13.5 without spilling (2026-12-08, on a CPU
# machine). block_h 64 runs the products on wgmma, 32 and 16 on mma.sync.
GRID = {
    "mla": list(itertools.product([32, 64], [64, 128], [2, 4, 6], [128])),
    "mla_wide": [(64, 32, 2, 256), (64, 64, 1, 256), (64, 32, 1, 256)],
    "mla_wide_few_heads": [(16, 32, 2, 128), (16, 64, 2, 128), (16, 64, 2, 256), (16, 32, 4, 128)],
}
KEYS = ("block_h", "block_n", "num_stages", "threads")


def copy_us(nbytes: int, dev) -> float:
    """Microseconds of a device-to-device copy of nbytes (as one graph, like the kernels)."""
    a = torch.empty(nbytes // 2, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    return 1e6 * bench(functools.partial(b.copy_, a))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="*", default=["64x8192"], help="BATCHxCONTEXT")
    p.add_argument("--shapes", nargs="*", default=["1b"], choices=sorted(SHAPES))
    p.add_argument("--default_only", action="store_true", help="only tilelang_decode.TILE, not the grid")
    p.add_argument("--splits", nargs="*", type=int, default=[], help="also the default tile at these split counts")
    p.add_argument("--rounds", type=int, default=0, help="then the best tile and Triton's alternately, R rounds")
    p.add_argument("--out", default="runs/benchmarks/decode_tilelang")
    a = p.parse_args(argv)
    from train_mla.inference import tilelang_decode as tl
    from train_mla.inference import triton_decode as tk

    if not tl.available():
        raise SystemExit("benchmarks/decode_tilelang.py needs TileLang (pip install -e '.[tilelang]') and a Hopper GPU")
    import tilelang

    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tilelang": tilelang.__version__}
    print(json.dumps(info), flush=True)
    rows, confirmed = [], []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows, "confirm": confirmed}, indent=2) + "\n")

    for shape, point in itertools.product(a.shapes, a.points):
        H, r, d_r = SHAPES[shape]
        B, T = map(int, point.split("x"))
        scale = (r + d_r) ** -0.5
        torch.manual_seed(0)
        cache = torch.randn(B, T + 64, r + d_r, device=dev, dtype=torch.bfloat16)
        q = torch.randn(B, H, r + d_r, device=dev, dtype=torch.bfloat16)
        lengths = torch.full((B,), T, device=dev, dtype=torch.int32)
        nbytes = B * T * (r + d_r) * 2
        ref = da.decode_attention_reference(q[:, None], cache[:, :, None], cache[:, :, None, :r], lengths, scale)
        ref = ref[:, 0].float()
        base = {"shape": shape, "point": point, "heads": H, "latent": r, "rope": d_r, "cache_mb": nbytes / 1e6}
        rows.append({**base, "kernel": "copy", "us": copy_us(nbytes, dev)})
        triton_call = functools.partial(
            tk.decode_attention_triton, q[:, None], cache[:, :, None], cache[:, :, None, :r], lengths, scale
        )
        candidates = {}
        err = float((triton_call()[:, 0].float() - ref).abs().max())
        rows.append({**base, "kernel": "triton TILE", "us": 1e6 * bench(triton_call), "max_abs_err": err})
        default = tl.tile_for(H, r + d_r)
        entry = next(name for name, t in tl.TILE.items() if t == default)
        grid = [dict(zip(KEYS, t)) for t in GRID[entry]]
        tiles = [default] + ([] if a.default_only else [t for t in grid if t != default])
        for tile, splits in [(t, None) for t in tiles] + [(default, s) for s in a.splits]:
            call = functools.partial(tl.decode_attention_tilelang, q, cache, lengths, scale, r, splits, tile, T)
            try:
                err = float((call().float() - ref).abs().max())
                row = {**base, "kernel": "tilelang", **tile, "splits": splits}
                row.update(us=1e6 * bench(call), max_abs_err=err)
                if err < 0.05:
                    candidates[len(rows)] = call
            except Exception as e:  # noqa: BLE001  (a tile that does not compile or fit this width)
                row = {**base, "kernel": "tilelang", **tile, "splits": splits}
                row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), row.get("error", "")[-300:], flush=True)
            save()
        try:  # the default tile's merge pass alone: what fusing it into the split pass could save at most
            _, combine, n = tl.plan(q, cache, r, None, default, T)
            part = torch.zeros(B, n, H, r, device=dev)
            lse, out_ = torch.zeros(B, n, H, device=dev), torch.empty(B, H, r, device=dev, dtype=q.dtype)
            merge = {"kernel": "tilelang merge pass alone", **default, "splits": n}
            us = 1e6 * bench(functools.partial(combine, part, lse, out_))
            rows.append({**base, **merge, "us": us, "tb_per_s": None})  # reads partial results, not the cache
        except Exception as e:  # noqa: BLE001
            print("merge pass alone failed:", str(e)[-300:], flush=True)
        for row in rows:
            if "us" in row and "tb_per_s" not in row:
                row["tb_per_s"] = row["cache_mb"] * 1e6 / (row["us"] * 1e-6) / 1e12
                if row["kernel"] == "copy":
                    row["tb_per_s"] *= 2  # read + write
        if a.rounds and candidates:
            best = min(candidates, key=lambda i: rows[i]["us"])
            times = alternate({"triton": triton_call, "tilelang": candidates[best]}, a.rounds)
            confirmed.append(
                {
                    **base,
                    "tile": {k: rows[best][k] for k in KEYS},
                    "rounds": a.rounds,
                    "triton_us": 1e6 * statistics.median(times["triton"]),
                    "tilelang_us": 1e6 * statistics.median(times["tilelang"]),
                    "rounds_tilelang_faster": sum(t < s for s, t in zip(times["triton"], times["tilelang"])),
                }
            )
            print("confirm", json.dumps(confirmed[-1]), flush=True)
        save()
        del cache, q
    lines = [
        f"device: {info['device']}, tilelang {info['tilelang']}",
        "",
        "| shape | point | kernel | tile (block_h, block_n, stages, threads) | splits | us | TB/s | max abs err |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        tile = ", ".join(str(row[k]) for k in KEYS) if "block_h" in row else ""
        splits = "" if "splits" not in row else (row["splits"] or "auto")
        if "us" in row:
            err = f"{row['max_abs_err']:.1e}" if "max_abs_err" in row else ""
            lines.append(
                f"| {row['shape']} | {row['point']} | {row['kernel']} | {tile} | {splits} | {row['us']:.1f} | "
                f"{'' if row['tb_per_s'] is None else format(row['tb_per_s'], '.2f')} | {err} |"
            )
        else:
            lines.append(f"| {row['shape']} | {row['point']} | {row['kernel']} | {tile} | {splits} | failed | | |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
