"""Tile sizes of the split-KV decode kernel: cache bandwidth of one attention call at batch 64, context 8k, for the
MLA layout (one latent head, 32 query heads, 64 + 32 columns) and the GQA layout (8 heads of 64, 4 queries each).

    python benchmarks/decode_kernel_sweep.py      # GPU; prints a table, writes docs/benchmarks/decode_kernel_sweep.json
    python benchmarks/decode_kernel_sweep.py --default_only --points 1x1024 64x8192 --out /tmp/k.json  # TILE only
    python benchmarks/decode_kernel_sweep.py --where tma=1 --confirm 10   # then TILE against the best, alternately

Bandwidth = cache bytes the call must read / its time (CUDA graph replays timed by CUDA events, median of 20; the
call is the split kernel and the merge kernel, or the split kernel alone with the fused merge). The best tile per
layout is what `decode_attention.TILE` holds;
`python benchmarks/decode.py --tiles SWEEP.json` runs the engine with the best of a sweep instead. The same tile can
measure 15 % apart in two calls minutes apart (docs/benchmarks.md): `--confirm R` times TILE's tile and the sweep's
best alternately R times each after the sweep, and reports both medians and the median of the per-round ratios.
"""

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.inference import decode_attention as da  # noqa: E402
from train_mla.inference import triton_decode as tk  # noqa: E402


def bench(fn, reps=20):
    """GPU time of one call: the call (kernel + merge of the splits) is captured as a CUDA graph, so that Python
    launch overhead, which the engine's graphs remove too, is not measured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def alternate(calls: dict, rounds: int, timer=bench) -> dict:
    """Each call timed `rounds` times, the calls in turn (A B A B ...), so a drift of the card's clock or temperature
    falls on all of them alike. Returns {name: [seconds per round]}."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(timer(fn))
    return times


def confirmation(times: dict) -> dict:
    """Medians of `alternate`'s rounds of the calls "baseline" and "best", and the median of the rounds' best /
    baseline ratios."""
    from statistics import median

    ratios = [b / a for a, b in zip(times["baseline"], times["best"])]
    return {
        "rounds": len(ratios),
        "baseline_us": 1e6 * median(times["baseline"]),
        "best_us": 1e6 * median(times["best"]),
        "best_over_baseline": median(ratios),
        "rounds_best_faster": sum(r < 1 for r in ratios),
    }


KEYS = ("programs_per_sm", "block_t", "num_warps", "num_stages", "transposed", "fused_merge", "balanced", "tma")


def tiles(*grids):
    """Every combination of each grid's values (a grid: one list per KEYS entry)."""
    return [dict(zip(KEYS, combo)) for grid in grids for combo in itertools.product(*grid)]


# tried per layout: the earlier formulation around its best tile, and the transposed one (tokens as the rows of the
# matrix units) over tiles, warps, stages and splits; both with the merge pass and with the fused merge; the
# balanced grid (programs per SM = the grid, not splits); and, for MLA, whole tiles by Hopper's copy engine (tma);
# `--set maxnreg=128` caps the registers of every tile (3 or 4 programs per SM can then be resident at once)
GRID = {
    "mla": tiles(
        ([2, 4], [128], [4], [3], [False], [False, True], [False], [False]),
        ([1, 2, 3, 4], [64, 128, 256], [4, 8], [2, 3], [True], [False, True], [False], [False]),
        ([1, 2, 3, 4, 6, 8], [64, 128], [4], [2, 3], [False, True], [True], [True], [False]),  # balanced grid
        ([1, 2, 3, 4], [64, 128, 256], [4, 8], [2, 3, 4], [False], [True], [True], [True]),  # balanced, copy engine
        ([2, 4], [128], [4], [3], [False], [True], [False], [True]),  # split-KV, copy engine
        ([2, 3, 4], [64, 128], [4], [2, 3], [True], [True], [True], [True]),  # balanced, transposed, copy engine
    ),
    "gqa": tiles(
        ([2], [64], [4], [3], [False, True], [False], [False], [False]),
        ([1, 2, 4], [64], [4], [3], [False], [True], [True], [False]),
    ),
}


def cases(dev, B, T, latent=64, rope=32, heads=32):
    """Per layout: q, k_cache, v_cache and the cache bytes one call must read at batch B, context T."""
    width = latent + rope
    mla_cache = torch.randn(B, T + 64, 1, width, device=dev, dtype=torch.bfloat16)
    return {
        "mla": (
            torch.randn(B, 1, heads, width, device=dev, dtype=torch.bfloat16),
            mla_cache,
            mla_cache[..., :latent],
            B * T * width * 2,
        ),
        "gqa": (
            torch.randn(B, 8, 4, 64, device=dev, dtype=torch.bfloat16),
            torch.randn(B, T + 64, 8, 64, device=dev, dtype=torch.bfloat16),
            torch.randn(B, T + 64, 8, 64, device=dev, dtype=torch.bfloat16),
            B * T * 8 * 64 * 2 * 2,
        ),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="runs/benchmarks/decode_kernel_sweep.json")
    p.add_argument("--out", dest="out_option", help="the output path, as an option (after --points)")
    p.add_argument("--points", nargs="*", default=["64x8192"], help="BATCHxCONTEXT")
    p.add_argument("--default_only", action="store_true", help="only decode_attention.TILE, not the GRID")
    p.add_argument(
        "--where", nargs="*", default=[], metavar="KEY=VALUE", help="only the GRID's tiles with these values (tma=1)"
    )
    p.add_argument(
        "--mla_shape",
        default="64,32,32",
        help="the MLA case's latent width, RoPE width and query heads (DeepSeek's: 512,64,16 or 512,64,128)",
    )
    p.add_argument("--layouts", nargs="*", default=["mla", "gqa"])
    p.add_argument(
        "--confirm", type=int, default=0, metavar="R", help="after it: TILE's and the best tile alternately, R rounds"
    )
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="set in every tile, e.g. heads_per_program=64"
    )
    args = p.parse_args(argv)
    args.out = args.out_option or args.out
    latent, rope, heads = map(int, args.mla_shape.split(","))
    wanted, fixed = key_values(args.where), key_values(args.set)
    grid = {
        layout: [{**t, **fixed} for t in g if all(int(t[k]) == v for k, v in wanted.items())]
        for layout, g in GRID.items()
    }
    dev = torch.device("cuda")
    rows, best, confirmed = [], {}, {}
    for point in args.points:
        B, T = map(int, point.split("x"))
        lengths = torch.full((B,), T, device=dev)
        for layout, (q, k, v, nbytes) in cases(dev, B, T, latent, rope, heads).items():
            if layout not in args.layouts:
                continue
            ref = da.decode_attention(q, k, v, lengths, 0.1, backend="torch").float()
            entry = tk.tile_layout(layout == "mla", latent, rope)  # the TILE entry the kernel takes for this cache
            default = dict(tk.TILE[entry])
            baseline = {**default, **fixed}
            base_row = None  # TILE's measurement, when it builds
            for tile in [baseline] if args.default_only else [baseline] + grid[layout]:  # TILE first: the baseline
                tk.TILE[entry] = dict(tile)
                splits = (
                    None if tile["balanced"] else tk.default_num_splits(B, q.shape[1], tk.multiprocessors(dev), entry)
                )
                try:
                    err = float((tk.decode_attention_triton(q, k, v, lengths, 0.1, splits).float() - ref).abs().max())
                    t = bench(functools.partial(tk.decode_attention_triton, q, k, v, lengths, 0.1, splits))
                except Exception as e:  # e.g. out of shared memory for the biggest tiles
                    rows.append({"layout": layout, "point": point, **tile, "error": str(e)[-3000:]})
                    print(
                        json.dumps({k: v for k, v in rows[-1].items() if k != "error"}),
                        "failed:",
                        str(e)[-300:],
                        flush=True,
                    )
                    continue
                rows.append(
                    {
                        "layout": layout,
                        "point": point,
                        **tile,
                        "splits": splits,
                        "us": 1e6 * t,
                        "tb_per_s": nbytes / t / 1e12,
                        "max_abs_err": err,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                if tile is baseline:
                    base_row = rows[-1]
                save(args.out, args.points, args.mla_shape, rows, best, confirmed)
            tk.TILE[entry] = default
            ok = [
                r
                for r in rows
                if "us" in r and r["max_abs_err"] < 0.05 and r["layout"] == layout and r["point"] == point
            ]  # a fast wrong kernel is no candidate
            if ok:
                name = entry if len(args.points) == 1 else f"{entry} {point}"
                best[name] = max(ok, key=lambda r: r["tb_per_s"])
                if args.confirm and not args.default_only and base_row in ok:
                    confirmed[name] = confirm(base_row, best[name], entry, args.confirm, q, k, v, lengths)
                    print("confirm", name, json.dumps(confirmed[name]), flush=True)
            save(args.out, args.points, args.mla_shape, rows, best, confirmed)
    print("best", json.dumps(best))
    return best


def confirm(base_row, best_row, entry, rounds, q, k, v, lengths, timer=bench) -> dict:
    """TILE's tile (`base_row`) against the sweep's best row, each with the tile and splits it was measured with,
    timed alternately."""
    default = dict(tk.TILE[entry])
    calls = {}
    for name, row in (("baseline", base_row), ("best", best_row)):
        tile = {key: row.get(key, value) for key, value in default.items()}  # TILE's keys, the row's values

        def call(tile=tile, splits=row["splits"]):
            tk.TILE[entry] = tile  # the kernel reads its tile when the graph is captured
            tk.decode_attention_triton(q, k, v, lengths, 0.1, splits)

        calls[name] = call
    try:
        return confirmation(alternate(calls, rounds, timer))
    finally:
        tk.TILE[entry] = default


def key_values(items: list[str]) -> dict[str, int]:
    """["tma=1", "heads_per_program=64"] -> {"tma": 1, "heads_per_program": 64} (booleans as 0/1)."""
    return {k: int(v) for k, v in (item.split("=") for item in items)}


def save(out, points, shape, rows, best, confirmed):
    """After every measurement, so that a sweep cut short keeps what it measured."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": torch.cuda.get_device_name(), "points": points, "mla_shape": shape, "rows": rows, "best": best}
    if confirmed:
        doc["confirm"] = confirmed
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
