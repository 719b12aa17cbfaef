"""Registers, shared memory and instruction mix of the decode kernel, per tile, compiled for a GPU target on any
machine: Triton builds the kernel that `decode_attention_triton` would launch (its own ptxas makes the cubin) and
nothing runs, so no GPU is needed.

    python benchmarks/kernel_resources.py                          # TILE["mla"] and the sweep's MLA grid, sm_90
    python benchmarks/kernel_resources.py --default_only --set num_warps=8 tma=0
    python benchmarks/kernel_resources.py --where tma=1 --mla_shape 512,64,16 --out runs/benchmarks/res.json

Per tile: registers per thread and stack bytes (`cuobjdump -res-usage`), shared memory per program, the programs one
multiprocessor can hold by registers, by shared memory and by warps (Hopper: 64 K registers, 228 KB, 64 warps), and
how often the PTX holds a bulk tensor copy (the copy engine, TMA), cp.async, wgmma and mma.sync. The lent GPUs give no
hardware counters (docs/benchmarks.md); this is the part of "why this tile" that can be read without them. Speed is
`decode_kernel_sweep.py`'s, on a GPU. The numbers are Triton's of this machine: the version matters.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from decode_kernel_sweep import GRID, KEYS, key_values  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import driver  # noqa: E402

from train_mla.inference import triton_decode as tk  # noqa: E402

SM = {"registers": 65536, "shared": 228 * 1024, "warps": 64, "reserved_shared": 1024}  # per multiprocessor, sm_90
PTX_OPS = {"tma": "cp.async.bulk.tensor", "cp_async": "cp.async.cg", "wgmma": "wgmma.mma_async", "mma_sync": "mma.sync"}


class TargetOnly(CudaDriver):
    """Triton's CUDA driver reporting a fixed target and no device: enough for JITFunction.warmup to compile a
    kernel, never to launch one (it loads no CUDA library)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Compile:
    """Stands in for a kernel in triton_decode: `kernel[grid](*args)` compiles it (warmup) and keeps the result."""

    def __init__(self, kernel, built: list):
        self.kernel, self.built = kernel, built

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.built.append(self.kernel.warmup(*args, grid=grid, **kwargs))


def compile_call(layout: str, tile: dict, q, k_cache, v_cache, sms: int) -> list:
    """The compiled kernels one decode_attention_triton call launches with `tile` as TILE[layout]."""
    saved = {n: getattr(tk, n) for n in ("balanced_decode", "split_kv_decode", "merge_splits", "multiprocessors")}
    before, built = dict(tk.TILE[layout]), []
    try:
        for n in ("balanced_decode", "split_kv_decode", "merge_splits"):
            setattr(tk, n, _Compile(saved[n], built))
        tk.multiprocessors = lambda device: sms
        tk.TILE[layout] = {**before, **tile}
        lengths = torch.full((q.shape[0],), k_cache.shape[1], dtype=torch.int32)
        tk.decode_attention_triton(q, k_cache, v_cache, lengths, q.shape[-1] ** -0.5)
    finally:
        tk.TILE[layout] = before
        for n, f in saved.items():
            setattr(tk, n, f)
    return built


def resources(kernel) -> dict:
    """Registers and stack from the cubin, shared memory and warps from Triton, instruction counts from the PTX, and
    the programs per multiprocessor each limit allows."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True)
    line = next(x for x in usage.stdout.splitlines() if "REG:" in x)  # the kernel's resource line
    fields = dict(item.split(":") for item in line.split())
    regs, warps, shared = int(fields["REG"]), kernel.metadata.num_warps, kernel.metadata.shared
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    fit = {
        "registers": SM["registers"] // (regs_per_warp * warps),
        "shared": SM["shared"] // (shared + SM["reserved_shared"]),
        "warps": SM["warps"] // warps,
    }
    ptx = kernel.asm["ptx"]
    return {
        "kernel": kernel.name,
        "registers": regs,
        "stack_bytes": int(fields["STACK"]),
        "shared_bytes": shared,
        "num_warps": warps,
        "num_stages": kernel.metadata.num_stages,
        "programs_per_sm_fit": fit,
        "programs_per_sm_max": min(fit.values()),
        "ptx": {name: ptx.count(op) for name, op in PTX_OPS.items()},
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| tile (per SM, tokens, warps, stages, transposed, fused merge, balanced, tma; heads per program) | kernel "
        "| registers | stack B | shared KB | programs/SM that fit (registers, shared, warps) | TMA copies | cp.async "
        "| wgmma | mma.sync |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        t = ", ".join(str(int(r["tile"][k]) if isinstance(r["tile"][k], bool) else r["tile"][k]) for k in KEYS)
        t += f"; {r['tile'].get('heads_per_program') or 'all'}"
        f, p = r["programs_per_sm_fit"], r["ptx"]
        lines.append(
            f"| {t} | {r['kernel']} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} "
            f"| {r['programs_per_sm_max']} ({f['registers']}, {f['shared']}, {f['warps']}) | {p['tma']} "
            f"| {p['cp_async']} | {p['wgmma']} | {p['mma_sync']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors, for the balanced grid's size")
    p.add_argument("--mla_shape", default="64,32,32", help="latent width, RoPE width, query heads")
    p.add_argument("--default_only", action="store_true", help="only TILE['mla'], not decode_kernel_sweep's GRID")
    p.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE", help="only the GRID's tiles with these")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="set in every tile, e.g. num_warps=8")
    p.add_argument("--out", default="runs/benchmarks/kernel_resources.json")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("kernel_resources.py compiles kernels: unset TRITON_INTERPRET")
    latent, rope, heads = map(int, args.mla_shape.split(","))
    wanted, fixed = key_values(args.where), key_values(args.set)
    tiles = [dict(tk.TILE["mla"])] if args.default_only else GRID["mla"]
    tiles = [{**t, **fixed} for t in tiles if all(int(t[k]) == v for k, v in wanted.items())]
    for t in tiles:
        t.update({k: bool(t[k]) for k in ("transposed", "fused_merge", "balanced", "tma")})
    batch = 64
    cache = torch.zeros(batch, 256, 1, latent + rope, dtype=torch.bfloat16)  # the code does not depend on its length
    q = torch.zeros(batch, 1, heads, latent + rope, dtype=torch.bfloat16)
    driver.set_active(TargetOnly(args.arch))  # for the rest of this process: it compiles and exits
    rows = []
    for tile in tiles:
        for kernel in compile_call("mla", tile, q, cache, cache[..., :latent], args.sms):
            rows.append({"tile": tile, **resources(kernel)})
        print(markdown(rows[-1:]).split("\n")[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"triton": triton.__version__, "arch": args.arch, "mla_shape": [latent, rope, heads], "sm_limits": SM}
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(f"{len(rows)} kernels -> {out}")


if __name__ == "__main__":
    main()
