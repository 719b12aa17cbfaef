"""Configuration of a Llama model whose attention layers were upcycled to Multi-head Latent Attention.

It is a `LlamaConfig` plus the MLA fields, so everything that is unchanged (embeddings, MLP, norms, RoPE
parameters of the source) keeps Llama's meaning. Every MLA field is checked on construction and a bad value
raises a `ValueError` that names the field and the allowed range.

This file is copied next to saved checkpoints (``auto_map``), so it imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

DECODE_PATHS = ("absorbed", "naive")
ROPE_KEY_SCALINGS = ("source", "deepseek_yarn")


@strict
class LlamaMLAConfig(LlamaConfig):
    r"""
    q_lora_rank (`int` or `None`): rank of the query down-projection ``q_a``; `None` = one full-rank ``q_proj``.
    kv_lora_rank (`int`): width of the cached latent ``c_kv``.
    qk_nope_head_dim (`int`): per-head query/key dims that carry no position (default ``head_dim - qk_rope_head_dim``).
    qk_rope_head_dim (`int`): width of the single RoPE key ``k_pe`` shared by all heads (even).
    v_head_dim (`int`): per-head value width (default ``head_dim``).
    use_lora_layer_norm (`bool`): RMSNorm on the query and KV latents (DeepSeek-V3 has it; X-EcoMLA recipes don't).
    mla_layers (`list[int]` or `None`): decoder layers that use MLA; the others keep Llama GQA. `None` = all.
    layer_ranks (`dict` or `None`): per-layer overrides ``{"<layer>": {"q_lora_rank": int|None, "kv_lora_rank": int}}``.
    rope_freq_indices (`list[int]` or `None`): which of the source's ``head_dim // 2`` RoPE frequencies the MLA
        RoPE key uses (``qk_rope_head_dim // 2`` of them). `None` = every ``head_dim // qk_rope_head_dim``-th one,
        i.e. a geometric schedule with the source's ``rope_theta``.
    rope_key_scaling (`str`): "source" = the RoPE key rotates at exactly the source's (scaled) frequencies;
        "deepseek_yarn" (a `llama3`-scaled source, ``rope_freq_indices`` 0, k, 2k, ...) = at the DeepSeek-YaRN
        frequencies fitted to the source's `llama3` rule: equal outside its transition band (wavelengths between
        ``original_max_position_embeddings / high_freq_factor`` and ``/ low_freq_factor``), a linear ramp inside it.
        It is the one scaled RoPE that vLLM's and SGLang's DeepSeek models compute (they turn every scaled
        ``rope_type`` into DeepSeek-YaRN), so an export runs there exactly.
    rope_interleave (`bool`): rotate adjacent pairs (2j, 2j+1) (DeepSeek / X-EcoMLA layout) instead of Llama's
        (j, j + d/2) halves.
    mla_decode_path (`str`): "absorbed" (attention in latent space when decoding with a cache) or "naive".
    """

    model_type = "llama_mla"

    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int = 32
    v_head_dim: int | None = None
    use_lora_layer_norm: bool = False
    mla_layers: list[int] | None = None
    layer_ranks: dict | None = None
    rope_freq_indices: list[int] | None = None
    rope_key_scaling: str = "source"
    rope_interleave: bool = False
    mla_decode_path: str = "absorbed"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.qk_nope_head_dim is None:
            self.qk_nope_head_dim = self.head_dim - self.qk_rope_head_dim
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.mla_layers is not None:
            self.mla_layers = sorted(int(i) for i in self.mla_layers)
        if self.layer_ranks is not None:
            self.layer_ranks = {str(k): dict(v) for k, v in self.layer_ranks.items()}
        if self.rope_freq_indices is None and self.qk_rope_head_dim > 0 and self.head_dim % self.qk_rope_head_dim == 0:
            stride = self.head_dim // self.qk_rope_head_dim
            self.rope_freq_indices = list(range(0, self.head_dim // 2, stride))
        self._check_mla_fields()

    # ------------------------------------------------------------------ validation
    def _check_mla_fields(self):
        L, H, hd, D = self.num_hidden_layers, self.num_attention_heads, self.head_dim, self.hidden_size

        def need(ok, field, allowed, value):
            if not ok:
                raise ValueError(f"LlamaMLAConfig.{field}={value!r} is invalid: allowed {allowed}.")

        d_r, d_n, d_v = self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim
        need(d_r >= 2 and d_r % 2 == 0 and d_r <= hd, "qk_rope_head_dim", f"an even number in [2, head_dim={hd}]", d_r)
        need(
            d_n == hd - d_r,
            "qk_nope_head_dim",
            f"head_dim - qk_rope_head_dim = {hd - d_r} (the upcycling keeps every head dimension)",
            d_n,
        )
        need(d_v == hd, "v_head_dim", f"head_dim = {hd} (values are copied, not compressed, per head)", d_v)
        need(self.mla_decode_path in DECODE_PATHS, "mla_decode_path", f"one of {DECODE_PATHS}", self.mla_decode_path)
        if self.mla_layers is not None:
            bad = [i for i in self.mla_layers if not 0 <= i < L]
            need(
                not bad and len(set(self.mla_layers)) == len(self.mla_layers),
                "mla_layers",
                f"distinct layer indices in [0, {L - 1}]",
                self.mla_layers,
            )
        idx = self.rope_freq_indices
        need(
            idx is not None
            and len(idx) == d_r // 2
            and len(set(idx)) == len(idx)
            and all(0 <= i < hd // 2 for i in idx),
            "rope_freq_indices",
            f"{d_r // 2} distinct frequency indices in [0, {hd // 2 - 1}] "
            f"(qk_rope_head_dim must divide head_dim when it is left unset)",
            idx,
        )

        need(
            self.rope_key_scaling in ROPE_KEY_SCALINGS,
            "rope_key_scaling",
            f"one of {ROPE_KEY_SCALINGS}",
            self.rope_key_scaling,
        )
        if self.rope_key_scaling == "deepseek_yarn":
            src = (self.rope_parameters or {}).get("rope_type", "default")
            need(
                src == "llama3",
                "rope_key_scaling",
                "'source' unless the source's rope_type is 'llama3' "
                f"(DeepSeek-YaRN is fitted to that rule; the source has {src!r})",
                self.rope_key_scaling,
            )
            k = idx[1] - idx[0] if len(idx) > 1 else 1
            need(
                k > 0 and idx == list(range(0, k * len(idx), k)),
                "rope_freq_indices",
                "0, k, 2k, ... with rope_key_scaling 'deepseek_yarn' (a geometric series, the form YaRN scales)",
                idx,
            )

        q_max, kv_max = min(D, H * (d_n + d_r)), min(D, H * (d_n + d_v))
        for layer in sorted(self.mla_layer_ids):
            q, kv = self.ranks(layer)
            prefix = f"layer_ranks['{layer}']." if str(layer) in (self.layer_ranks or {}) else ""
            need(
                q is None or (isinstance(q, int) and 1 <= q <= q_max),
                prefix + "q_lora_rank",
                f"null or an int in [1, {q_max}] (min(hidden_size, heads * (qk_nope + qk_rope)))",
                q,
            )
            need(
                isinstance(kv, int) and 1 <= kv <= kv_max,
                prefix + "kv_lora_rank",
                f"an int in [1, {kv_max}] (min(hidden_size, heads * (qk_nope + v_head_dim)))",
                kv,
            )
        for key, val in (self.layer_ranks or {}).items():
            need(
                key.isdigit() and int(key) in self.mla_layer_ids,
                "layer_ranks",
                f"keys that are MLA layer indices, got key {key!r}",
                key,
            )
            need(
                set(val) <= {"q_lora_rank", "kv_lora_rank"},
                f"layer_ranks['{key}']",
                "only the keys q_lora_rank and kv_lora_rank",
                sorted(val),
            )

    # ------------------------------------------------------------------ helpers
    @property
    def mla_layer_ids(self) -> set[int]:
        return set(range(self.num_hidden_layers)) if self.mla_layers is None else set(self.mla_layers)

    def ranks(self, layer_idx: int) -> tuple[int | None, int]:
        """(q_lora_rank, kv_lora_rank) of one MLA layer, honouring `layer_ranks`."""
        over = (self.layer_ranks or {}).get(str(layer_idx), {})
        return over.get("q_lora_rank", self.q_lora_rank), over.get("kv_lora_rank", self.kv_lora_rank)


__all__ = ["LlamaMLAConfig"]
