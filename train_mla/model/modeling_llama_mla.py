"""A Llama causal LM whose `mla_layers` use Multi-head Latent Attention; every other piece is Llama's own.

Loading is strict: a checkpoint with a missing or unexpected tensor is an error that names it.
This file is copied next to saved checkpoints (``auto_map``), so it imports only torch and transformers.
"""

from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_llama_mla import LlamaMLAConfig
from .mla_attention import MLAAttention, MLARotaryEmbedding


class LlamaMLAPreTrainedModel(LlamaPreTrainedModel):
    config: LlamaMLAConfig
    config_class = LlamaMLAConfig
    _no_split_modules = ["LlamaDecoderLayer", "LlamaMLADecoderLayer"]

    def _init_weights(self, module):
        if isinstance(module, MLARotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config)[0])
        else:
            super()._init_weights(module)


class LlamaMLADecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm block (forward inherited) with MLA in place of GQA."""

    def __init__(self, config: LlamaMLAConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # not LlamaDecoderLayer.__init__: no throw-away GQA weights
        self.hidden_size = config.hidden_size
        self.self_attn = MLAAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LlamaMLAModel(LlamaMLAPreTrainedModel, LlamaModel):
    def __init__(self, config: LlamaMLAConfig):
        LlamaMLAPreTrainedModel.__init__(self, config)  # LlamaModel's fields, with an MLA/GQA choice per layer
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            LlamaMLADecoderLayer(config, i) if i in config.mla_layer_ids else LlamaDecoderLayer(config, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)  # full-head RoPE for the layers that stay GQA
        self.gradient_checkpointing = False
        self.post_init()


class LlamaMLAForCausalLM(LlamaMLAPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: LlamaMLAConfig):
        LlamaMLAPreTrainedModel.__init__(self, config)  # not LlamaForCausalLM.__init__: no throw-away GQA model
        self.model = LlamaMLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Like `PreTrainedModel.from_pretrained`, but a missing or unexpected tensor is an error."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
        if info.get("mismatched_keys"):
            problems["mismatched_keys"] = sorted(str(m) for m in info["mismatched_keys"])
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            detail = "; ".join(f"{k}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
            raise ValueError(f"Checkpoint {where} does not match the LlamaMLA model built from its config ({detail}).")
        return (model, info) if want_info else model


__all__ = ["LlamaMLADecoderLayer", "LlamaMLAForCausalLM", "LlamaMLAModel", "LlamaMLAPreTrainedModel"]
