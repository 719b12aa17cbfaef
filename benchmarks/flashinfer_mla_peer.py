"""FlashInfer's MLA decode kernel beside ours (Triton's, and TileLang's where it is installed), on the same latent
cache, queries and GPU.

    python benchmarks/flashinfer_mla_peer.py      # GPU + flashinfer-python: runs/benchmarks/flashinfer_mla.{json,md}
    python benchmarks/flashinfer_mla_peer.py \
        --tiles docs/benchmarks/decode_kernel_sweep.json   # ours with a sweep's best tile

The cache is the engine's MLA layout: one row [c_kv | k_pe] of r + d_r values per token, sequences of capacity T
side by side. FlashInfer reads it as pages of `--page_size` tokens (`kv_cache = cache.view(pages, page_size, r + d_r)`,
the packed layout of `BatchMLAPagedAttentionWrapper`), so both kernels read the same bytes. Queries are the absorbed
MQA-mode queries [B, H, r + d_r]; both outputs [B, H, r] are checked against `decode_attention_reference`.
Timing as in decode_kernel_sweep.py: one call captured as a CUDA graph, median of 20 replays; where FlashInfer's call
cannot be captured, CUDA events around eager calls (said in the row). Bandwidth = cache bytes read / time.
The planning (FlashInfer's `plan`, our split count) is outside the timed call for both.
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_kernel_sweep import bench  # noqa: E402

from train_mla.inference import decode_attention as da  # noqa: E402
from train_mla.inference import tilelang_decode  # noqa: E402
from train_mla.inference import triton_decode as tk  # noqa: E402

SHAPES = {
    "1b": (32, 64, 32),  # llama3.2_1B/mla_kv_rank_64_8bt.yaml: 32 heads, latent 64, RoPE key 32
    "deepseek_v3_tp8": (16, 512, 64),  # DeepSeek-V3's 128 heads over 8 GPUs, latent 512, RoPE key 64
    "deepseek_v3": (128, 512, 64),  # all 128 on one GPU
}


def eager_time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def timed(fn):
    try:
        return bench(fn), "graph"
    except Exception:  # noqa: BLE001  (a call that cannot be captured is timed eagerly)
        torch.cuda.synchronize()
        return eager_time(fn), "eager"


def flashinfer_call(q, cache, lengths, scale, page_size, backend, d_r):
    import flashinfer

    B, cap, width = cache.shape
    H, r = q.shape[1], width - d_r
    pages_per_seq = cap // page_size
    used = (lengths + page_size - 1) // page_size
    kv_indptr = torch.zeros(B + 1, dtype=torch.int32)
    kv_indptr[1:] = used.cpu().cumsum(0)
    kv_indices = torch.cat([b * pages_per_seq + torch.arange(int(used[b])) for b in range(B)]).int()
    qo_indptr = torch.arange(B + 1, dtype=torch.int32)
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.int8, device=q.device)
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend=backend)
    meta = flashinfer.mla.MLAPlanMetadata.csr(
        qo_indptr.to(q.device), kv_indptr.to(q.device), kv_indices.to(q.device), lengths.int()
    )
    wrapper.plan(
        metadata=meta,
        num_heads=H,
        head_dim_ckv=r,
        head_dim_kpe=d_r,
        page_size=page_size,
        causal=False,
        sm_scale=scale,
        q_data_type=q.dtype,
        kv_data_type=cache.dtype,
    )
    kv = cache.view(B * pages_per_seq, page_size, width)
    out = torch.empty(B, H, r, device=q.device, dtype=q.dtype)
    return lambda: wrapper.run(query=q, kv_cache=kv, out=out)  # keeps the planned wrapper alive


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="*", default=["1x1024", "64x8192", "16x32768"], help="BATCHxCONTEXT")
    p.add_argument("--shapes", nargs="*", default=["1b"], choices=sorted(SHAPES))
    p.add_argument("--backends", nargs="*", default=["fa3", "fa2"], help="FlashInfer MLA backends to try")
    p.add_argument("--page_size", type=int, default=64)
    p.add_argument("--tiles", help="a decode_kernel_sweep.py output: our kernel with its best MLA tile")
    p.add_argument("--out", default="runs/benchmarks/flashinfer_mla")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/flashinfer_mla_peer.py measures a GPU kernel against FlashInfer's.")
    if a.tiles:  # a sweep's best tile per TILE entry it measured ("mla"; "mla_wide" at DeepSeek's widths)
        for entry, best in json.loads(Path(a.tiles).read_text())["best"].items():
            if entry in ("mla", "mla_wide"):
                tk.TILE[entry] = {**tk.TILE[entry], **{k: best[k] for k in tk.TILE[entry] if k in best}}
    try:
        import flashinfer

        fi_version = flashinfer.__version__
    except Exception as e:  # noqa: BLE001
        fi_version = f"not importable: {e}"
    dev = torch.device("cuda")
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "flashinfer": fi_version,
        "page_size": a.page_size,
        "our_tiles": {entry: dict(tk.TILE[entry]) for entry in ("mla", "mla_wide")},
    }
    print(json.dumps(info), flush=True)
    rows = []
    for shape in a.shapes:
        H, r, d_r = SHAPES[shape]
        scale = (r + d_r) ** -0.5
        for point in a.points:
            B, T = (int(v) for v in point.split("x"))
            cap = -(-T // a.page_size) * a.page_size
            torch.manual_seed(0)
            cache = torch.randn(B, cap, r + d_r, device=dev, dtype=torch.bfloat16)
            q = torch.randn(B, H, r + d_r, device=dev, dtype=torch.bfloat16)
            lengths = torch.full((B,), T, device=dev, dtype=torch.int32)
            nbytes = B * T * (r + d_r) * 2
            ref = da.decode_attention_reference(q[:, None], cache[:, :, None], cache[:, :, None, :r], lengths, scale)[
                :, 0
            ].float()
            base = {
                "shape": shape,
                "heads": H,
                "latent": r,
                "rope": d_r,
                "batch": B,
                "context": T,
                "cache_mb": nbytes / 1e6,
            }
            try:
                ours = functools.partial(
                    tk.decode_attention_triton, q[:, None], cache[:, :, None], cache[:, :, None, :r], lengths, scale
                )
                err = float((ours()[:, 0].float() - ref).abs().max())
                t, how = timed(ours)
                rows.append(
                    {
                        **base,
                        "kernel": "ours",
                        "us": 1e6 * t,
                        "tb_per_s": nbytes / t / 1e12,
                        "timed": how,
                        "max_abs_err": err,
                    }
                )
            except Exception as e:  # noqa: BLE001  (e.g. a tile too big for this width)
                rows.append({**base, "kernel": "ours", "error": str(e)[-2000:]})
            print(
                json.dumps({k: v for k, v in rows[-1].items() if k != "error"}),
                rows[-1].get("error", "")[-300:],
                flush=True,
            )
            if tilelang_decode.available():  # the Hopper kernel, its default tile for these widths
                try:
                    call = functools.partial(tilelang_decode.decode_attention_tilelang, q, cache, lengths, scale, r)
                    err = float((call().float() - ref).abs().max())
                    t, how = timed(call)
                    row = {"kernel": "tilelang", "us": 1e6 * t, "tb_per_s": nbytes / t / 1e12, "timed": how}
                    rows.append({**base, **row, "max_abs_err": err})
                except Exception as e:  # noqa: BLE001
                    rows.append({**base, "kernel": "tilelang", "error": f"{type(e).__name__}: {e}"[-2000:]})
                print(
                    json.dumps({k: v for k, v in rows[-1].items() if k != "error"}),
                    rows[-1].get("error", "")[-300:],
                    flush=True,
                )
            for backend in a.backends:
                try:
                    t0 = time.time()
                    call = flashinfer_call(q, cache, lengths, scale, a.page_size, backend, d_r)
                    err = float((call().float() - ref).abs().max())
                    first_s = time.time() - t0  # includes FlashInfer's JIT build on first use
                    t, how = timed(call)
                    rows.append(
                        {
                            **base,
                            "kernel": f"flashinfer {backend}",
                            "us": 1e6 * t,
                            "tb_per_s": nbytes / t / 1e12,
                            "timed": how,
                            "max_abs_err": err,
                            "plan_and_first_call_s": first_s,
                        }
                    )
                except Exception as e:  # noqa: BLE001  (a backend that refuses this shape or this GPU)
                    rows.append(
                        {**base, "kernel": f"flashinfer {backend}", "error": f"{type(e).__name__}: {e}"[-2000:]}
                    )
                print(
                    json.dumps({k: v for k, v in rows[-1].items() if k != "error"}),
                    rows[-1].get("error", "")[-300:],
                    flush=True,
                )
            del cache, q
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    lines = [
        "| shape | batch | context | kernel | us | TB/s | timed | max abs err |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for r_ in rows:
        if "us" in r_:
            lines.append(
                f"| {r_['shape']} | {r_['batch']} | {r_['context']:,} | {r_['kernel']} | {r_['us']:.1f} | "
                f"{r_['tb_per_s']:.2f} | {r_['timed']} | {r_['max_abs_err']:.1e} |"
            )
        else:
            lines.append(
                f"| {r_['shape']} | {r_['batch']} | {r_['context']:,} | {r_['kernel']} | failed | | | "
                f"{r_['error'][:120].replace('|', '/')} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
