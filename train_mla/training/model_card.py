"""README.md of a trained model: what it is, where it came from, its KV cache and how to load and score it."""

from pathlib import Path


def model_card(what: str, source: str, out: Path, kv: dict | None, metrics: dict) -> str:
    """README.md of a trained model: what it is, where it came from, its KV cache and how to load and score it."""
    lines = [
        f"# {out.name}: {what}",
        "",
        f"Trained with train_mla (X-EcoMLA upcycling of grouped-query attention into multi-head latent "
        f"attention) from `{source}`.",
        "",
    ]
    if kv:
        lines += [
            f"KV cache: {kv['mla_bytes_per_token']:,} bytes per token against {kv['source_bytes_per_token']:,} "
            f"for the GQA source ({100 * kv['kv_ratio']:.1f} %), {kv['layers']} layers, 2 bytes per value; "
            f"originally upcycled from `{kv.get('source', '?')}`.",
            "",
        ]
    lines += [
        "Training metrics: "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()),
        "",
        "Load with `import train_mla` then `transformers.AutoModelForCausalLM.from_pretrained(path)`; score with "
        "`bash eval.sh path`; chat with `python -m train_mla.chat path`.",
        "",
    ]
    return "\n".join(lines)
