"""X-EcoMLA: upcycle a Llama-family model's GQA attention into Multi-head Latent Attention.

Importing the package registers the MLA classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(mla_checkpoint)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from train_mla.model.configuration_llama_mla import LlamaMLAConfig
from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM

AutoConfig.register(LlamaMLAConfig.model_type, LlamaMLAConfig, exist_ok=True)
AutoModelForCausalLM.register(LlamaMLAConfig, LlamaMLAForCausalLM, exist_ok=True)
# save_pretrained() then writes auto_map and copies the model files next to the weights, so users
# without this package can load checkpoints with trust_remote_code=True.
LlamaMLAConfig.register_for_auto_class()
LlamaMLAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LlamaMLAConfig", "LlamaMLAForCausalLM"]
