"""Does llama.cpp run an exported MLA model as transformers does? Perplexity, greedy tokens and cache bytes per token.

    python benchmarks/llama_cpp_check.py MLA_CKPT --llama_cpp_dir DIR [--text FILE] [--tokens 4096] [--window 512]
                                         [--name NAME] [--work DIR]

MLA_CKPT is an exportable MLA checkpoint (use_lora_layer_norm: true). DIR is a llama.cpp source tree with its own
`convert_hf_to_gguf.py` and `gguf-py/` (llama-cpp-python's sdist vendors one: `vendor/llama.cpp`); `llama_cpp`
(llama-cpp-python) must be importable. Steps: `export_deepseek` -> llama.cpp's converter (float32 GGUF) -> the same
token windows through transformers' stock `DeepseekV3ForCausalLM` and through llama.cpp (token ids, so both see the
same input whatever the tokenizers do), greedy continuation of the text's first 32 tokens, and the KV-cache size
llama.cpp reports in its log against this project's accounting. Prints a table, writes
runs/benchmarks/llama_cpp_NAME.{json,md}.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def convert_to_gguf(hf_dir: Path, gguf: Path, llama_cpp_dir: Path) -> None:
    script = llama_cpp_dir / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"error: {script} not found (--llama_cpp_dir must be a llama.cpp source tree)")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp_dir / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    )
    r = subprocess.run(
        [sys.executable, str(script), str(hf_dir), "--outtype", "f32", "--outfile", str(gguf)],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"error: llama.cpp's converter failed:\n{r.stderr[-3000:]}")


def window_nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Summed next-token NLL of one window from its [len, vocab] logits."""
    lp = torch.log_softmax(logits[:-1].double(), -1)
    tgt = torch.tensor(ids[1:])
    return -lp.gather(1, tgt[:, None]).sum().item(), len(ids) - 1


def transformers_side(hf_dir: Path, windows: list[list[int]], prompt: list[int], n_new: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    nll = n = 0
    with torch.no_grad():
        for w in windows:
            s, k = window_nll(model(torch.tensor([w])).logits[0], w)
            nll, n = nll + s, n + k
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n_new,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return math.exp(nll / n), out[0, len(prompt) :].tolist(), type(model).__name__


class StderrCapture:
    """llama.cpp's log, whichever way it comes: llama-cpp-python forwards it to Python's sys.stderr, the C library
    may write to fd 2 directly; both are captured for the duration."""

    def __enter__(self):
        import io

        self.file = tempfile.TemporaryFile(mode="w+b")
        sys.stderr.flush()
        self.saved, self.saved_py = os.dup(2), sys.stderr
        os.dup2(self.file.fileno(), 2)
        sys.stderr = self.py = io.StringIO()
        return self

    def __exit__(self, *exc):
        sys.stderr = self.saved_py
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.py.getvalue() + self.file.read().decode(errors="replace")
        self.file.close()


def kv_bytes_from_log(log: str) -> tuple[float, str]:
    """Bytes per cached token from llama.cpp's 'llama_kv_cache: size = X MiB (N cells, ...' line."""
    m = re.search(r"llama_kv_cache:\s*size\s*=\s*([\d.]+)\s*MiB\s*\(\s*(\d+)\s*cells[^\n]*", log)
    if not m:
        raise SystemExit("error: no 'llama_kv_cache: size = ... MiB (N cells' line in llama.cpp's log")
    return float(m.group(1)) * 2**20 / int(m.group(2)), m.group(0).strip()


CACHE_CTX = 32768


def llama_cpp_side(gguf: Path, windows: list[list[int]], prompt: list[int], n_new: int, n_ctx: int):
    import llama_cpp

    # the cache size from a separate long-context load, so that the log's MiB with two decimals is exact to < 0.1 %
    # (the evaluation context keeps logits for every position: n_ctx x vocab floats, too much at 32k)
    with StderrCapture() as cap:
        big = llama_cpp.Llama(model_path=str(gguf), n_ctx=CACHE_CTX, verbose=True, n_threads=1)
    del big
    bytes_per_token, line = kv_bytes_from_log(cap.text)
    with StderrCapture():
        llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, logits_all=True, verbose=True, n_threads=os.cpu_count(), seed=0
        )
    arch = re.search(r"general\.architecture\s+str\s*=\s*(\S+)", cap.text)
    nll = n = 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        s, k = window_nll(torch.tensor(llm.scores[: len(w)]), w)
        nll, n = nll + s, n + k
    llm.reset()
    llm.eval(prompt)
    new = []
    for _ in range(n_new):
        t = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        new.append(t)
        llm.eval([t])
    return math.exp(nll / n), new, bytes_per_token, line, arch.group(1) if arch else "?"


def check(ckpt: str, llama_cpp_dir: str, ids: list[int], window: int, work: Path, n_new: int = 32) -> dict:
    from train_mla.conversion.deepseek_export import export_checkpoint
    from train_mla.model.configuration_llama_mla import LlamaMLAConfig
    from train_mla.model.kv_cache_size import kv_elements_per_layer

    hf_dir, gguf = work / "deepseek_v3", work / "model-f32.gguf"
    export_checkpoint(ckpt, hf_dir)
    convert_to_gguf(hf_dir, gguf, Path(llama_cpp_dir))
    windows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    prompt = ids[:32]
    hf_ppl, hf_new, arch_hf = transformers_side(hf_dir, windows, prompt, n_new)
    cpp_ppl, cpp_new, cpp_bytes, kv_line, arch = llama_cpp_side(gguf, windows, prompt, n_new, window)
    ours = sum(kv_elements_per_layer(LlamaMLAConfig.from_pretrained(ckpt))) * 2  # f16/bf16 cache
    return {
        "checkpoint": str(ckpt),
        "windows": len(windows),
        "window": window,
        "tokens": len(windows) * window,
        "transformers_model": arch_hf,
        "llama_cpp_arch": arch,
        "ppl_transformers_f32": hf_ppl,
        "ppl_llama_cpp_f32": cpp_ppl,
        "ppl_rel_diff": cpp_ppl / hf_ppl - 1,
        "greedy_tokens": n_new,
        "greedy_equal": hf_new == cpp_new,
        "greedy_first_difference": next((i for i, (a, b) in enumerate(zip(hf_new, cpp_new)) if a != b), None),
        "kv_bytes_per_token_llama_cpp": cpp_bytes,
        "kv_bytes_per_token_ours": ours,
        "llama_cpp_kv_line": kv_line,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--llama_cpp_dir", required=True)
    p.add_argument("--text", default="../shared/data/wikitext-2/wiki.test.raw")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--name", default=None, help="writes runs/benchmarks/llama_cpp_NAME.{json,md}")
    p.add_argument("--work", default=None, help="folder for the export and the GGUF (default: a temporary one)")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("error: llama_cpp is not importable (pip install llama-cpp-python)") from None
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    ids = tok(Path(a.text).read_text(), add_special_tokens=False).input_ids[: a.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        r = check(a.checkpoint, a.llama_cpp_dir, ids, a.window, work)
    r["text"] = a.text
    md = "\n".join(
        [
            f"llama.cpp against transformers on `{a.checkpoint}` exported to DeepSeek-V3 (float32 GGUF), first "
            f"{r['tokens']} tokens of `{Path(a.text).name}` in {r['windows']} windows of {r['window']}:",
            "",
            "| | transformers (DeepseekV3ForCausalLM) | llama.cpp | |",
            "|---|---:|---:|---|",
            f"| perplexity | {r['ppl_transformers_f32']:.4f} | {r['ppl_llama_cpp_f32']:.4f} | "
            f"{100 * r['ppl_rel_diff']:+.3f} % |",
            f"| greedy tokens ({r['greedy_tokens']}) | | | "
            f"{'equal' if r['greedy_equal'] else 'differ from token ' + str(r['greedy_first_difference'])} |",
            f"| KV bytes per token | {r['kv_bytes_per_token_ours']:,} (ours) | "
            f"{r['kv_bytes_per_token_llama_cpp']:,.0f} | |",
            "",
            f"llama.cpp's log: `{r['llama_cpp_kv_line']}` (arch `{r['llama_cpp_arch']}`)",
        ]
    )
    print(md)
    if a.name:
        out = Path(__file__).resolve().parents[1] / "runs" / "benchmarks" / f"llama_cpp_{a.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
        out.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {out}.json, .md")


if __name__ == "__main__":
    main()
