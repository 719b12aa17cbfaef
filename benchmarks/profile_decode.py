"""Where a decode step's GPU time goes: kernels of one engine step (no CUDA graph, so each kernel is visible) for the
GQA and MLA models of benchmarks/decode.py, eager and with torch.compile, at each (batch x context) point.

    python benchmarks/profile_decode.py                                    # GPU; batch 64 x 8k
    python benchmarks/profile_decode.py --points 1x1024 64x8192 --compiled_only --out /tmp/profile.json
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decode  # noqa: E402

from train_mla.inference.engine import Engine  # noqa: E402


def profile_point(model, batch, context, compiled, dev):
    engine = Engine(model, batch, context + 16, cuda_graphs=False, compile=compiled)
    g = torch.Generator().manual_seed(0)
    logits = engine.prefill(
        [torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist() for _ in range(batch)],
        list(range(batch)),
    )
    tokens, positions = logits.argmax(-1), torch.full((batch,), context, device=dev)
    with torch.inference_mode():
        for _ in range(3):  # warm-up (and compilation)
            engine.step(tokens, positions)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.step(tokens, positions)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    top = sorted(events, key=lambda e: -e.device_time_total)[:12]
    del engine, logits
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "kernel_us_per_step": sum(e.device_time_total for e in events) / 3,
        "kernels_per_step": sum(e.count for e in events) / 3,
        "top": [
            {"kernel": e.key[:80], "us_per_step": e.device_time_total / 3, "calls_per_step": e.count / 3} for e in top
        ],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="*", default=["64x8192"], help="BATCHxCONTEXT")
    p.add_argument("--compiled_only", action="store_true", help="only the torch.compile'd step")
    p.add_argument("--out", default="runs/benchmarks/decode_profile.json")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    models, _ = decode.build_models(False, dev, torch.bfloat16)
    result = {"device": torch.cuda.get_device_name(), "steps": 3, "runs": {}}
    for point in args.points:
        batch, context = map(int, point.split("x"))
        for name, model in models.items():
            for compiled in (True,) if args.compiled_only else (False, True):
                run = profile_point(model, batch, context, compiled, dev)
                result["runs"][f"{name}, {point}, compile={compiled}"] = run
                print(
                    f"{name}, {point}, compile={compiled}: {run['kernel_us_per_step']:.0f} us of kernels in "
                    f"{run['kernels_per_step']:.0f} launches per step",
                    flush=True,
                )
                for t in run["top"]:
                    print(f"    {t['us_per_step']:8.1f} us  x{t['calls_per_step']:.0f}  {t['kernel']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
