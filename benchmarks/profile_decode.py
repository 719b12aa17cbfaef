"""Where a decode step's GPU time goes: kernels of one engine step (no CUDA graph, so each kernel is visible) for the
GQA and MLA models of benchmarks/decode.py at batch 64, context 8k, eager and with torch.compile.

    python benchmarks/profile_decode.py      # GPU; writes docs/benchmarks_profile.json and prints the top kernels
"""

import gc
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decode  # noqa: E402

from train_mla.engine import Engine  # noqa: E402


def main(batch=64, context=8192, out="docs/benchmarks_profile.json"):
    dev = torch.device("cuda")
    models, _ = decode.build_models(False, dev, torch.bfloat16)
    result = {"device": torch.cuda.get_device_name(), "batch": batch, "context": context, "steps": 3, "runs": {}}
    for name, model in models.items():
        for compiled in (False, True):
            engine = Engine(model, batch, context + 16, cuda_graphs=False, compile=compiled)
            g = torch.Generator().manual_seed(0)
            logits = engine.prefill([torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist()
                                     for _ in range(batch)], list(range(batch)))
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
            run = {"kernel_us_per_step": sum(e.device_time_total for e in events) / 3,
                   "kernels_per_step": sum(e.count for e in events) / 3,
                   "top": [{"kernel": e.key[:80], "us_per_step": e.device_time_total / 3, "calls_per_step": e.count / 3}
                           for e in top]}
            result["runs"][f"{name}, compile={compiled}"] = run
            print(f"{name}, compile={compiled}: {run['kernel_us_per_step']:.0f} us of kernels in "
                  f"{run['kernels_per_step']:.0f} launches per step", flush=True)
            for t in run["top"]:
                print(f"    {t['us_per_step']:8.1f} us  x{t['calls_per_step']:.0f}  {t['kernel']}")
            del engine, logits
            gc.collect()
            torch.cuda.empty_cache()
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(out=sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks_profile.json")
