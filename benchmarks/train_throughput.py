"""Stage-1 training throughput through the real `DistillTrainer`: random-weight models of published shapes, synthetic
packed batches, the same Trainer, loss, optimizer and launcher as `train_mla/train_distill.py`. One variant per call:

    python benchmarks/train_throughput.py --shape smollm2 --compile                      # single process
    accelerate launch --config_file deepspeed_zero3.yaml --num_processes 1 \
        benchmarks/train_throughput.py --shape smollm2 --compile                         # the README's DeepSpeed path
    accelerate launch --config_file deepspeed_zero3.yaml --zero_stage 2 --num_processes 1 \
        benchmarks/train_throughput.py --shape smollm2 --compile                         # one GPU: nothing to shard
    python benchmarks/train_throughput.py --shape tiny --steps 2 --warmup 1 --out /tmp/x  # CPU smoke test

Shapes: `smollm2` (SmolLM2-135M student upcycled to kv 80 + rope 16 = 25 % KV, full-rank query, self-distilled from
a SmolLM2-135M-shaped teacher), `1b_8b` (Llama-3.2-1B student at kv 64 + rope 32, q 1424, Llama-3.1-8B teacher),
`tiny`. Student weights are float32 master copies under bf16 autocast, the teacher is bf16 (as in training). Weights
are random: speed does not depend on them. `--documents` restarts positions every ~600 tokens as packed ShareGPT
data does (transformers then masks attention across documents). Each call appends its row to OUT.json / OUT.md
(rows with the same settings are replaced). Tokens/s is the median over the timed steps.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import LLAMA_1B, LLAMA_8B, MLA_1B, MLA_SMOLLM2_25, MLA_TINY, SMOLLM2, TINY, config  # noqa: E402

SHAPES = {
    "smollm2": (SMOLLM2, MLA_SMOLLM2_25, SMOLLM2),
    "1b_8b": (LLAMA_1B, MLA_1B, LLAMA_8B),
    "tiny": (TINY, MLA_TINY, TINY),
}


def synthetic_data(vocab: int, n: int, seq: int, documents: bool, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "position_ids": [], "labels": []}
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        if documents:  # documents of 200-1000 tokens, positions restarting at each
            pos, left = [], seq
            while left > 0:
                d = min(left, int(torch.randint(200, 1000, (1,), generator=g)))
                pos += list(range(d))
                left -= d
        else:
            pos = list(range(seq))
        rows["input_ids"].append(ids)
        rows["position_ids"].append(pos)
        rows["labels"].append(ids)
    return Dataset.from_dict(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="compile_layers: true")
    p.add_argument("--documents", action="store_true", help="packed documents (attention masked across them)")
    p.add_argument("--chunk", type=int, default=4096, help="loss_chunk_size")
    p.add_argument("--loss", choices=["chunked", "liger"], default="chunked", help="loss_implementation")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--teacher_fp8", action="store_true", help="teacher_fp8: true (the teacher's decoder in FP8)")
    p.add_argument(
        "--out",
        default="runs/benchmarks/train_throughput",
        help="OUT.json / OUT.md (docs/benchmarks/train_throughput.md holds the published table)",
    )
    a = p.parse_args(argv)

    from transformers import LlamaForCausalLM

    from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM
    from train_mla.training.arguments import DistillConfig
    from train_mla.training.data import PackedCollator
    from train_mla.training.distill_trainer import DistillTrainer

    gpu = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")) if deepspeed else None
    student_shape, mla, teacher_shape = SHAPES[a.shape]
    tmp = tempfile.mkdtemp(prefix="train_throughput_")
    args = DistillConfig(
        output_dir=tmp,
        max_steps=a.warmup + a.steps,
        per_device_train_batch_size=a.batch,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=gpu,
        use_cpu=not gpu and not deepspeed,
        compile_layers=a.compile,
        loss_chunk_size=a.chunk,
        loss_implementation=a.loss,
        teacher_fp8=a.teacher_fp8,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=2,
        ddp_backend=None if gpu or not deepspeed else "gloo",
    )
    torch.manual_seed(0)
    s_cfg, t_cfg = config(student_shape, mla), config(teacher_shape)
    s_cfg._attn_implementation = t_cfg._attn_implementation = a.attn
    with torch.device("cuda" if gpu else "cpu"):  # random init of an 8B teacher takes minutes on CPU cores
        student = LlamaMLAForCausalLM(s_cfg)  # float32 master weights
        teacher = LlamaForCausalLM(t_cfg).to(torch.bfloat16 if gpu else torch.float32)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak of training, not of the teacher's float32 init
    data = synthetic_data(s_cfg.vocab_size, a.batch * (a.warmup + a.steps), a.seq, a.documents)
    trainer = DistillTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data,
        data_collator=PackedCollator(0, with_attention_mask=False, pad_to=a.seq),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "tokens_per_second_per_device" in h]
    timed = [h["tokens_per_second_per_device"] for h in logs[a.warmup :]]
    row = {
        "shape": a.shape,
        "deepspeed_stage": stage,
        "compile_layers": a.compile,
        "documents": a.documents,
        "attn": a.attn,
        "batch": a.batch,
        "seq": a.seq,
        "loss_chunk_size": a.chunk,
        "loss": a.loss,
        "teacher_fp8": a.teacher_fp8,
        "tokens_per_s": statistics.median(timed),
        "min": min(timed),
        "max": max(timed),
        "timed_steps": len(timed),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
    }
    if trainer.is_world_process_zero():
        record(row, Path(a.out))
        print(json.dumps(row), flush=True)


KEY = (
    "shape",
    "deepspeed_stage",
    "compile_layers",
    "documents",
    "attn",
    "batch",
    "seq",
    "loss_chunk_size",
    "loss",
    "teacher_fp8",
)
DEFAULTS = {"loss": "chunked", "teacher_fp8": False}  # for rows recorded before these options


def record(row: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    old = lambda r: tuple(r.get(k, DEFAULTS.get(k)) for k in KEY)  # noqa: E731
    rows = [r for r in rows if old(r) != tuple(row[k] for k in KEY)] + [row]
    path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        "Stage-1 throughput through `DistillTrainer` (`python benchmarks/train_throughput.py`, see its docstring); "
        "tokens/s = median over the timed steps, per device.",
        "",
        "| shape | launcher | compiled layers | packed documents | attention | loss | teacher | batch x seq | tokens/s "
        "| min-max | peak GiB | device |",
        "|---|---|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        launcher = "single process" if r["deepspeed_stage"] is None else f"accelerate + ZeRO-{r['deepspeed_stage']}"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        lines.append(
            f"| {r['shape']} | {launcher} | "
            f"{'yes' if r['compile_layers'] else 'no'} | {'yes' if r['documents'] else 'no'} | {r['attn']} | "
            f"{r.get('loss', 'chunked')} | {'FP8' if r.get('teacher_fp8') else 'bf16'} | "
            f"{r['batch']} x {r['seq']} | {r['tokens_per_s']:,.0f} | {r['min']:,.0f}-{r['max']:,.0f} | {peak} | "
            f"{r['device']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
