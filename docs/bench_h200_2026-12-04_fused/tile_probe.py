"""Call 8 of the ninth lease: the balanced grid for GQA and smaller MLA tiles at small batch, default tiles beside them.

    python3 docs/bench_h200_2026-12-04_fused/tile_probe.py OUT.json
"""
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "benchmarks")]
from decode_kernel_sweep import bench, cases  # noqa: E402
from train_mla import decode_attention as da  # noqa: E402

dev = torch.device("cuda")
probe = {"gqa": [dict(da.TILE["gqa"])] + [dict(da.TILE["gqa"], balanced=True, fused_merge=True, programs_per_sm=n)
                                          for n in (1, 2, 4)],
         "mla": [dict(da.TILE["mla"])] + [dict(da.TILE["mla"], block_t=t, programs_per_sm=n) for t in (32, 64)
                                          for n in (2, 4)]}
rows = []
for point in ("1x1024", "8x1024", "64x1024", "64x8192"):
    B, T = map(int, point.split("x"))
    lengths = torch.full((B,), T, device=dev)
    for layout, (q, k, v, nbytes) in cases(dev, B, T).items():
        ref = da.decode_attention(q, k, v, lengths, 0.1, backend="torch").float()
        default = dict(da.TILE[layout])
        for tile in probe[layout]:
            da.TILE[layout] = tile
            err = float((da.decode_attention_triton(q, k, v, lengths, 0.1).float() - ref).abs().max())
            t = bench(lambda: da.decode_attention_triton(q, k, v, lengths, 0.1))
            rows.append({"point": point, "layout": layout, **tile, "us": 1e6 * t, "tb_per_s": nbytes / t / 1e12,
                         "max_abs_err": err})
            print(f"{point:8} {layout} balanced={tile['balanced']} block_t={tile['block_t']} per_sm={tile['programs_per_sm']}"
                  f" {1e6 * t:8.1f} us  err {err:.4f}", flush=True)
        da.TILE[layout] = default
Path(sys.argv[1]).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")
