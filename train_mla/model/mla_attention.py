"""Multi-head Latent Attention (DeepSeek-V2/V3 style) as a drop-in for Llama's attention.

Per token the layer caches only the latent ``c_kv`` (``kv_lora_rank`` values) and one RoPE key ``k_pe``
(``qk_rope_head_dim`` values) shared by all heads. Two ways to attend, side by side below:

* naive ("MHA mode", training and prefill): up-project ``c_kv`` to per-head keys/values with ``kv_b_proj``;
* absorbed ("MQA mode", decoding): fold the key up-projection into the query and the value up-projection
  into the output, and attend directly over the latent cache (one shared key/value "head").

Notation: B batch, L new tokens, T cached + new tokens, H heads, D hidden, r kv_lora_rank,
d_n qk_nope_head_dim, d_r qk_rope_head_dim, d_v v_head_dim.
This file is copied next to saved checkpoints (``auto_map``), so it imports only torch and transformers.
"""

from types import SimpleNamespace

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

from .configuration_llama_mla import LlamaMLAConfig


class MLARotaryEmbedding(nn.Module):
    """cos/sin for the shared RoPE key: the source model's own frequencies at ``rope_freq_indices``.

    Using the source's frequencies (after its scaling, e.g. Llama-3's ``llama3`` rule) keeps the rotation of
    every kept frequency identical to the original model at every position, so no YaRN substitute is needed.
    ``rope_key_scaling: deepseek_yarn`` is that substitute, for engines that compute nothing else (see
    ``deepseek_yarn_parameters``).
    """

    def __init__(self, config: LlamaMLAConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "dynamic":
            raise ValueError(
                "rope_parameters.rope_type='dynamic' is not supported by the MLA RoPE key "
                "(its frequencies change with sequence length); use 'default', 'linear', 'llama3' or 'yarn'."
            )
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d_r / 2]

    @staticmethod
    def series_theta(config: LlamaMLAConfig) -> float:
        """theta of the series theta^(-2j/d_r) that rope_freq_indices 0, k, 2k, ... keep of the source's
        base^(-2i/head_dim) (i = k j; the caller checks the indices have that form)."""
        idx = config.rope_freq_indices
        k = idx[1] - idx[0] if len(idx) > 1 else 1
        return float(config.rope_parameters["rope_theta"]) ** (k * config.qk_rope_head_dim / config.head_dim)

    @staticmethod
    def deepseek_yarn_parameters(config: LlamaMLAConfig) -> dict:
        """DeepSeek-V3 rope_parameters of YaRN over the key's series theta^(-2j/d_r), fitted to the source's `llama3`
        rule: the same factor and original context, its band edges as YaRN's (beta_fast = high_freq_factor rotations
        over the original context, beta_slow = low_freq_factor), and no magnitude change (mscale 0, attention_factor
        1): unchanged below the band, divided by the factor above it, a linear ramp over the indices inside."""
        src = config.rope_parameters
        return {
            "rope_type": "yarn",
            "rope_theta": MLARotaryEmbedding.series_theta(config),
            "factor": float(src["factor"]),
            "original_max_position_embeddings": src["original_max_position_embeddings"],
            "beta_fast": float(src["high_freq_factor"]),
            "beta_slow": float(src["low_freq_factor"]),
            "mscale": 0.0,
            "mscale_all_dim": 0.0,
            "attention_factor": 1.0,
        }

    @staticmethod
    def compute_inv_freq(config: LlamaMLAConfig) -> tuple[torch.Tensor, float]:
        if config.rope_key_scaling == "deepseek_yarn":
            from transformers import LlamaConfig

            key = LlamaConfig(
                hidden_size=config.qk_rope_head_dim,
                num_attention_heads=1,
                head_dim=config.qk_rope_head_dim,
                # factor x original context: the length YaRN assumes (any other draws a warning
                # from transformers; the frequencies use the explicit factor either way)
                max_position_embeddings=int(
                    float(config.rope_parameters["factor"]) * config.rope_parameters["original_max_position_embeddings"]
                ),
                rope_parameters=MLARotaryEmbedding.deepseek_yarn_parameters(config),
            )
            inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](key)  # [d_r / 2]
            return inv_freq.to(torch.float32), scaling
        rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = (
            LlamaRotaryEmbedding.compute_default_rope_parameters
            if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type]
        )
        full, scaling = init_fn(config)  # [head_dim / 2], exactly the source model's frequencies
        return full.to(torch.float32)[torch.tensor(config.rope_freq_indices)], scaling

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)  # [B, L, d_r/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, d_r]
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, heads, L, d_r] with cos/sin [B, L, d_r].

    interleave=False: pairs (j, j + d_r/2) as in Llama. interleave=True: pairs (2j, 2j+1) as in DeepSeek; the
    pairs are first gathered into halves, so the output is in half layout (identical for q and k, so every
    dot product is the interleaved-rotation one).
    """
    if interleave:
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(3, 4).reshape(b, h, t, d)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class MLAAttention(nn.Module):
    """One MLA layer; same call signature and return value as ``LlamaAttention``."""

    def __init__(self, config: LlamaMLAConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.ranks(layer_idx)
        self.qk_nope_head_dim, self.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.scaling = self.qk_head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.num_key_value_groups = 1  # the naive path up-projects one key/value per query head
        D, H, bias = config.hidden_size, self.num_heads, config.attention_bias

        def norm(width):
            return LlamaRMSNorm(width, eps=1e-6) if config.use_lora_layer_norm else nn.Identity()

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = norm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = norm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=bias)
        self.rotary_emb = MLARotaryEmbedding(config)

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, position_ids=None, **kwargs
    ):
        # position_embeddings (Llama's full-head cos/sin) are not used: the MLA RoPE key has its own width.
        B, L, _ = hidden_states.shape
        H, r, d_n, d_r, d_v = (
            self.num_heads,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        )
        if position_ids is None:
            past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            position_ids = torch.arange(past, past + L, device=hidden_states.device)[None]

        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))  # [B, L, H*(d_n+d_r)]
        q = q.view(B, L, H, self.qk_head_dim).transpose(1, 2)  # [B, H, L, d_n+d_r]
        q_nope, q_pe = q.split([d_n, d_r], dim=-1)  # [B, H, L, d_n], [B, H, L, d_r]

        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([r, d_r], dim=-1)  # [B, L, r], [B, L, d_r]
        c_kv = self.kv_a_layernorm(c_kv).unsqueeze(1)  # [B, 1, L, r]
        k_pe = k_pe.unsqueeze(1)  # [B, 1, L, d_r]

        cos, sin = self.rotary_emb(hidden_states, position_ids)  # [B, L, d_r]
        q_pe = apply_rope(q_pe, cos, sin, self.config.rope_interleave)
        k_pe = apply_rope(k_pe, cos, sin, self.config.rope_interleave)

        if cache is not None:  # the cache holds (latent, rope key) where Llama holds (key, value)
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx, kwargs=kwargs)  # [B, 1, T, r], [B, 1, T, d_r]
        T = c_kv.shape[2]
        impl = self.config._attn_implementation
        dropout = self.attention_dropout if self.training else 0.0
        decoding = T > L and self.config.mla_decode_path == "absorbed" and impl in ("sdpa", "eager")

        if not decoding:  # naive: per-head keys and values from the latent
            kv = self.kv_b_proj(c_kv.squeeze(1)).view(B, T, H, d_n + d_v).transpose(1, 2)  # [B, H, T, d_n+d_v]
            k_nope, v = kv.split([d_n, d_v], dim=-1)  # [B, H, T, d_n], [B, H, T, d_v]
            k = torch.cat([k_nope, k_pe.expand(B, H, T, d_r)], dim=-1)  # [B, H, T, d_n+d_r]
            q = torch.cat([q_nope, q_pe], dim=-1)  # [B, H, L, d_n+d_r]
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
            out, weights = attend(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        else:  # absorbed: attention over the latent cache, one shared key/value head
            w_kb = self.kv_b_proj.weight.view(H, d_n + d_v, r)
            w_uk, w_uv = w_kb[:, :d_n], w_kb[:, d_n:]  # [H, d_n, r], [H, d_v, r]
            q_lat = torch.einsum("bhld,hdr->bhlr", q_nope, w_uk)  # [B, H, L, r]
            q_abs = torch.cat([q_lat, q_pe], dim=-1)  # [B, H, L, r+d_r]
            k_abs = torch.cat([c_kv, k_pe], dim=-1)  # [B, 1, T, r+d_r]
            mqa = SimpleNamespace(num_key_value_groups=H, is_causal=True, training=self.training)
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
            o_lat, weights = attend(
                mqa, q_abs, k_abs, c_kv, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )  # [B, L, H, r]
            out = torch.einsum("blhr,hvr->blhv", o_lat, w_uv)  # [B, L, H, d_v]

        return self.o_proj(out.reshape(B, L, H * d_v)), weights
