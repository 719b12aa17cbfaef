"""Stage-1 training throughput on one GPU: a Llama-3.2-1B-shaped MLA student (kv 64 + rope 32, q 1424) distilled
from an 8B-shaped teacher (Llama-3.1-8B shape) and from a 1B-shaped one (self-distillation), sequences of 2048.

    python benchmarks/train_throughput.py                  # writes docs/benchmarks_train.{json,md}
    python benchmarks/train_throughput.py --smoke --out /tmp/x   # tiny shapes on CPU: checks that the script runs

One step = teacher forward (no grad) + student forward + KL loss + backward + AdamW step, the work of
`DistillTrainer` without DeepSpeed (one GPU; student weights fp32 under bf16 autocast, teacher bf16). Weights are
random: speed does not depend on them. Variants, each timed over --steps steps after warm-up:

* `full fp32 logits`: both models' logits materialised, KL in fp32 (the straightforward way);
* `chunked loss`: `distill_loss` (logits chunk by chunk, recomputed in backward), as the training script does;
* `chunked loss + compile`: the same with every decoder layer of both models under `torch.compile`.

Next to them the component bound measured in the same run: teacher forward alone + student training step alone
(its own chunked cross-entropy, same optimizer): what a step would cost if distillation added nothing.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import LlamaForCausalLM  # noqa: E402

from shapes import LLAMA_1B, LLAMA_8B, MLA_1B, MLA_TINY, TINY, config  # noqa: E402
from train_mla.distill_loss import distill_loss  # noqa: E402
from train_mla.modeling_llama_mla import LlamaMLAForCausalLM  # noqa: E402

SHAPES = {"1B": LLAMA_1B, "8B": LLAMA_8B, "tiny": TINY}


def make(shape, mla, dtype, device):
    cfg = config(SHAPES[shape], mla)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = (LlamaMLAForCausalLM if mla is not None else LlamaForCausalLM)(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", default=["8B", "1B"])
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk", type=int, default=4096, help="loss_chunk_size of the chunked variants")
    p.add_argument("--variants", nargs="+", default=["full fp32 logits", "chunked loss", "chunked loss + compile"])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="docs/benchmarks_train")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        raise SystemExit("benchmarks/train_throughput.py measures a GPU; on CPU use --smoke.")
    amp = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.smoke:
        a.teachers, a.batch, a.seq, a.steps, a.warmup, a.chunk = ["tiny"], 2, 64, 1, 1, 32
    student = make("tiny" if a.smoke else "1B", MLA_TINY if a.smoke else MLA_1B, torch.float32, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, student.config.vocab_size, (a.batch, a.seq), device=device)
    labels = ids.clone()
    tokens = a.batch * a.seq
    result = {"info": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                       "batch": a.batch, "seq": a.seq, "tokens_per_step": tokens, "steps": a.steps,
                       "student_params": sum(p.numel() for p in student.parameters()),
                       "weights": "random (speed does not depend on them)"}, "rows": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row):
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result) + "\n")

    def student_only():  # the student's own training step: chunked CE, backward, AdamW
        with torch.autocast(device.type, amp, enabled=device.type == "cuda"):
            h = student.model(ids, use_cache=False).last_hidden_state
            loss, _ = distill_loss(h, h.detach(), student.lm_head, student.lm_head, labels, kl_weight=0.0, ce_weight=1.0,
                                   chunk_size=a.chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_student = timed(student_only, a.steps, a.warmup, device)
    for name in a.teachers:
        teacher = make(name, None, amp, device).eval().requires_grad_(False)

        def teacher_only():
            with torch.no_grad():
                teacher.model(ids, use_cache=False)

        def full_logits():
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)
            with torch.autocast(device.type, amp, enabled=device.type == "cuda"):
                s_logits = student(ids, use_cache=False).logits
            s_logp = F.log_softmax(s_logits.float(), -1)
            loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def chunked():
            with torch.no_grad():
                t_hidden = teacher.model(ids, use_cache=False).last_hidden_state
            with torch.autocast(device.type, amp, enabled=device.type == "cuda"):
                s_hidden = student.model(ids, use_cache=False).last_hidden_state
                loss, _ = distill_loss(s_hidden, t_hidden, student.lm_head, teacher.lm_head, labels, chunk_size=a.chunk)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_teacher = timed(teacher_only, a.steps, a.warmup, device)
        bound = t_teacher + t_student
        base = {"teacher": name, "teacher_forward_s": t_teacher, "student_step_s": t_student,
                "component_bound_tokens_per_s": tokens / bound}
        for variant in a.variants:
            fn = full_logits if variant == "full fp32 logits" else chunked
            if "compile" in variant:
                for m in (student, teacher):
                    for layer in m.model.layers:
                        layer.compile()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                step = timed(fn, a.steps, a.warmup, device)
            except torch.OutOfMemoryError as e:
                record({**base, "variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"})
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            record({**base, "variant": variant, "step_s": step, "tokens_per_s": tokens / step,
                    "fraction_of_bound": bound / step, "warmup_and_timing_s": time.perf_counter() - t0,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
        for m in (student, teacher):  # undo compile for the next teacher
            for layer in m.model.layers:
                layer._compiled_call_impl = None
        teacher = None  # free the GPU memory before the next teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(result))


def markdown(r) -> str:
    i = r["info"]
    lines = [f"Device: {i['device']}, torch {i['torch']}; {i['batch']} x {i['seq']} = {i['tokens_per_step']:,} tokens per "
             f"step; student {i['student_params'] / 1e9:.2f} B parameters; weights {i['weights']}; {i['steps']} timed steps.",
             "", "| teacher | variant | step s | tokens/s | component bound tokens/s | fraction of bound | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        if "error" in x:
            lines.append(f"| {x['teacher']} | {x['variant']} | {x['error']} | | {x['component_bound_tokens_per_s']:,.0f} | | |")
            continue
        peak = f"{x['peak_memory_gib']:.1f}" if x["peak_memory_gib"] else "-"
        lines.append(f"| {x['teacher']} | {x['variant']} | {x['step_s']:.3f} | {x['tokens_per_s']:,.0f} | "
                     f"{x['component_bound_tokens_per_s']:,.0f} | {x['fraction_of_bound']:.2f} | {peak} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
