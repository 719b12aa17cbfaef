"""KV-cache accounting: elements and bytes cached per token, per layer and in total, source vs MLA.

A GQA layer caches K and V: 2 * num_key_value_heads * head_dim values per token. An MLA layer caches the
latent and the shared RoPE key: kv_lora_rank + qk_rope_head_dim values per token.
"""


def kv_elements_per_layer(config) -> list[int]:
    gqa = 2 * config.num_key_value_heads * config.head_dim
    if config.model_type != "llama_mla":
        return [gqa] * config.num_hidden_layers
    mla_ids = config.mla_layer_ids
    return [
        config.ranks(i)[1] + config.qk_rope_head_dim if i in mla_ids else gqa for i in range(config.num_hidden_layers)
    ]


def kv_cache_table(source_config, mla_config, bytes_per_element: int = 2) -> dict:
    """Per-token cache size of both models; `bytes_per_element` 2 = bf16/fp16 cache."""
    src, mla = kv_elements_per_layer(source_config), kv_elements_per_layer(mla_config)
    return {
        "layers": len(src),
        "bytes_per_element": bytes_per_element,
        "source_elements_per_token_per_layer": src,
        "mla_elements_per_token_per_layer": mla,
        "source_bytes_per_token": sum(src) * bytes_per_element,
        "mla_bytes_per_token": sum(mla) * bytes_per_element,
        "kv_ratio": sum(mla) / sum(src),
    }


def format_kv_table(t: dict) -> str:
    src, mla = t["source_elements_per_token_per_layer"], t["mla_elements_per_token_per_layer"]
    per_layer = lambda v: str(v[0]) if len(set(v)) == 1 else f"{min(v)}-{max(v)} (mean {sum(v) / len(v):.1f})"
    b = t["bytes_per_element"]
    return "\n".join(
        [
            f"| model | KV elements / token / layer | KV bytes / token (all {t['layers']} layers, {b} B/elem) | "
            "ratio |",
            "|---|---:|---:|---:|",
            f"| source (GQA) | {per_layer(src)} | {t['source_bytes_per_token']:,} | 100 % |",
            f"| MLA | {per_layer(mla)} | {t['mla_bytes_per_token']:,} | {100 * t['kv_ratio']:.3f} % "
            f"({1 / t['kv_ratio']:.2f}x smaller) |",
        ]
    )
