"""Why an exportable (latent RMSNorm) MLA model is dead at step 0: perplexity with the latent norm replaced by variants.

    python benchmarks/latent_norm_probe.py MLA_CKPT [--text ../shared/data/wikitext-2/wiki.test.raw] [--tokens 1024]

MLA_CKPT has use_lora_layer_norm: true (e.g. `python -m train_mla.upcycle smollm2_135M/mla_kv_rank_16_exportable.yaml
--refine_steps 0 --output X`). Each kv_a_layernorm (RMSNorm(c) = c / rms(c) * w) is swapped for:
  norm        the layer as it is;
  first_exact the same, except that position 0's latent passes unchanged (as without a norm);
  clipped     c * clamp(w / rms(c), 0.8, 1.25): the per-token rescaling limited to +-25 %;
  identity    no norm at all (the MLA model the SVD factors were fitted for).
The first token of a sequence is where attention heads put their "sink"; how much of the loss comes back when only
that token is left alone says where the norm does its damage. Prints one perplexity per variant.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ProbeNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, mode: str):
        super().__init__()
        self.weight, self.eps, self.mode = weight, eps, mode

    def forward(self, c):  # c: [B, L, r]
        if self.mode == "identity":
            return c
        scale = self.weight / c.pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()  # [B, L, r]
        if self.mode == "clipped":
            scale = scale.clamp(0.8, 1.25)
        out = c * scale
        if self.mode == "first_exact":
            out = torch.cat([c[:, :1], out[:, 1:]], dim=1)
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--text", default="../shared/data/wikitext-2/wiki.test.raw")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=512)
    a = p.parse_args(argv)
    from train_mla.model.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(a.checkpoint, "float32", "sdpa", None).eval()
    if not model.config.use_lora_layer_norm:
        raise SystemExit(f"error: {a.checkpoint} has no latent norm (use_lora_layer_norm: false)")
    tok = load_tokenizer(a.checkpoint, None)
    ids = tok(Path(a.text).read_text(), add_special_tokens=False).input_ids[: a.tokens]
    x = torch.tensor(ids[: len(ids) // a.window * a.window]).view(-1, a.window)
    norms = [layer.self_attn.kv_a_layernorm for layer in model.model.layers]
    print(f"| latent norm variant | perplexity ({x.numel()} tokens of {Path(a.text).name}, windows of {a.window}) |")
    print("|---|---:|")
    for mode in ("norm", "first_exact", "clipped", "identity"):
        for layer, n in zip(model.model.layers, norms):
            layer.self_attn.kv_a_layernorm = ProbeNorm(n.weight.detach(), n.variance_epsilon, mode)
        with torch.no_grad():
            print(f"| {mode} | {math.exp(model(x, labels=x).loss.item()):,.1f} |", flush=True)


if __name__ == "__main__":
    main()
