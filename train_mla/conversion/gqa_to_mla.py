"""Upcycle a pre-trained Llama-family model's GQA attention into MLA, initialised from its weights by SVD.

Per converted layer (H query heads, G KV heads, head_dim hd, D hidden):
  * query:  W_q [H*hd, D], rows regrouped per head into [no-RoPE | RoPE], factorised  q_b @ q_a  (rank r_q);
  * key/value: [K_nope; V] of the G source heads factorised  up @ down  (rank r_kv); `down` is the latent
    projection, `up` is repeated to the H query heads exactly like GQA's repeat_kv -> kv_b; plain SVD, or the
    best fit on calibration activations (`init_method`), optionally with K/V balancing;
  * shared RoPE key: the RoPE rows of K averaged over the G KV heads, or per frequency their principal direction;
  * o_proj, MLP, norms, embeddings and head: copied (never shared with the source);
  * optionally (`refine_steps`) each MLA layer is then fitted to its source layer's output (`refine.py`).

Two RoPE treatments (`rope_init`):
  * ``keep_pairs`` (default): the RoPE key keeps whole rotation pairs (j, j + hd/2) of the source at the
    frequencies in ``rope_freq_indices`` (default: the fastest d_r/2), rotated exactly as Llama rotates them; the
    other pairs become no-RoPE dims.
  * ``xecomla``: the paper's recipe - the first d_n rows of each head are no-RoPE, the last d_r rows are rotated
    as DeepSeek interleaved pairs at a geometric schedule over d_r (splits source pairs; kept to reproduce the paper).

Run as ``python -m train_mla.upcycle [recipe.yaml] [--key value ...] --output DIR``. With ``--torch_dtype float32
--output RUN/upcycled`` it writes the folder stage 1 would write, which ``train_distill.py RECIPE --output_dir RUN``
then reuses: upcycle once, e.g. while the GPU does something else, and train from it.
"""

import math
import time
from dataclasses import dataclass, field

import torch

from train_mla.conversion.calibration import attention_input_moments, calibration_token_blocks, sqrt_psd
from train_mla.conversion.low_rank import energy_rank, factorize, orthonormal_completion, round_up, singular_values
from train_mla.model.configuration_llama_mla import LlamaMLAConfig
from train_mla.training.arguments import MLAArguments

_DROP_CONFIG_KEYS = {
    "model_type",
    "architectures",
    "auto_map",
    "quantization_config",
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
}


def head_rows(head_dim: int, d_rope: int, rope_init: str, freq_indices: list[int]) -> tuple[list[int], list[int]]:
    """(no-RoPE rows, RoPE rows) of one source head, in the order the MLA head stores them."""
    if rope_init == "xecomla":
        return list(range(head_dim - d_rope)), list(range(head_dim - d_rope, head_dim))
    half, kept = head_dim // 2, sorted(freq_indices)
    rest = [j for j in range(half) if j not in set(kept)]
    return rest + [j + half for j in rest], kept + [j + half for j in kept]


def resolve_rope_freq_indices(mla: MLAArguments) -> list[int] | None:
    """keep_pairs without explicit indices keeps the fastest qk_rope_head_dim/2 frequencies: the ones that rotate
    most within a context and so lose most when made position-free (the slow ones barely turn over thousands of
    tokens). xecomla uses the config's geometric schedule (None)."""
    if mla.rope_init == "keep_pairs" and mla.rope_freq_indices is None:
        return list(range(mla.qk_rope_head_dim // 2))
    return mla.rope_freq_indices


def build_config(
    source_config, mla: MLAArguments, layer_ranks: dict | None = None, rope_freq_indices: list[int] | None = None
) -> LlamaMLAConfig:
    """LlamaMLAConfig = the source Llama config + the MLA fields (validated on construction)."""
    if source_config.model_type != "llama":
        raise ValueError(f"model_type={source_config.model_type!r}: only Llama-architecture sources can be upcycled.")
    if getattr(source_config, "attention_bias", False):
        raise ValueError(
            "attention_bias=True sources are not supported: the SVD init factorises bias-free projections."
        )
    base = {k: v for k, v in source_config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    return LlamaMLAConfig(
        **base,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        v_head_dim=mla.v_head_dim,
        use_lora_layer_norm=mla.use_lora_layer_norm,
        mla_layers=mla.mla_layers,
        layer_ranks=layer_ranks,
        rope_freq_indices=rope_freq_indices,
        rope_key_scaling=mla.rope_key_scaling,
        rope_interleave=mla.rope_init == "xecomla",
        mla_decode_path=mla.mla_decode_path,
    )


@dataclass
class LayerFactors:
    tensors: dict = field(default_factory=dict)  # MLA parameter name (relative to self_attn) -> tensor
    q_rank: int | None = None
    kv_rank: int = 0


def rope_pairs(d_rope: int, rope_init: str) -> list[tuple[int, int]]:
    """Index pairs inside the RoPE slice that rotate together (interleaved for xecomla, halves for keep_pairs)."""
    half = d_rope // 2
    return [(2 * j, 2 * j + 1) for j in range(half)] if rope_init == "xecomla" else [(j, j + half) for j in range(half)]


def _fit(W: torch.Tensor, rank: int, L: torch.Tensor | None, svd_kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of rank `rank`: plain SVD, or with input statistics L = C^{1/2} the best fit on the data,
    up = top left singular vectors of W L, down = up^T W."""
    if L is None:
        return factorize(W, rank, **svd_kw)
    up, _ = factorize(W @ L, rank, **svd_kw)
    return up, up.T @ W


def _spectrum(W: torch.Tensor, L: torch.Tensor | None, svd_kw: dict) -> torch.Tensor:
    return singular_values(W if L is None else W @ L, **svd_kw)


def _kv_matrix(attn, cfg: LlamaMLAConfig, mla: MLAArguments, C: torch.Tensor, nope: list[int]):
    """The weighted [K_nope; V] rows of the G KV heads that the latent factorises: (M [G*rows, D], A_inv (undoes
    the weights), rows that reach kv_b, rows per head)."""
    H, G, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    d_v, g = cfg.v_head_dim, H // G
    Wk = attn.k_proj.weight.detach().to("cpu", torch.float64).view(G, hd, D)
    Wv = attn.v_proj.weight.detach().to("cpu", torch.float64).view(G, hd, D)
    k_svd_rows = list(range(hd)) if mla.rope_init == "xecomla" else nope  # the paper also factorises the RoPE rows
    Kf, Vf = Wk[:, k_svd_rows], Wv  # [G, rows_k, D], [G, d_v, D]
    # Left weights A per KV head (the fit minimises ||A (W - W_r) L||): identity, or with init_method=output what
    # the layer's output sees of an error - a key error through the queries of its group (E[q q^T] on the
    # calibration data), a value error through o_proj (W_o^T W_o) - so rank goes where it changes the output.
    A_k = torch.eye(len(k_svd_rows), dtype=torch.float64).expand(G, -1, -1)
    A_v = torch.eye(d_v, dtype=torch.float64).expand(G, -1, -1)
    if mla.init_method == "output":
        Wq_k = attn.q_proj.weight.detach().to("cpu", torch.float64).view(G, g, hd, D)[:, :, k_svd_rows]
        Wo = attn.o_proj.weight.detach().to("cpu", torch.float64).view(D, G, g, hd)
        A_k = torch.stack([sqrt_psd(torch.einsum("hid,de,hje->ij", Wq_k[i], C, Wq_k[i])) for i in range(G)])
        A_v = torch.stack([sqrt_psd(torch.einsum("dhi,dhj->ij", Wo[:, i], Wo[:, i])) for i in range(G)])
    Kw, Vw = A_k @ Kf, A_v @ Vf
    nope_in_k = [k_svd_rows.index(j) for j in nope]  # the key rows that reach kv_b
    if mla.kv_balance:  # equal output energy for keys and values, so the rank is not spent on the larger one
        energy = lambda W: torch.einsum("gid,de,gie->", W, C, W).sqrt()  # noqa: E731
        k_w, v_w = 1 / energy(Kw[:, nope_in_k]), 1 / energy(Vw)
    else:
        k_w = v_w = torch.tensor(1.0, dtype=torch.float64)
    M = torch.cat([Kw * k_w, Vw * v_w], dim=1)  # [G, rows, D]
    rows = M.shape[1]
    M = M.reshape(G * rows, D)
    keep = nope_in_k + [len(k_svd_rows) + j for j in range(d_v)]  # rows that reach kv_b
    A_inv = torch.linalg.inv(torch.block_diag(*[torch.block_diag(A_k[i] * k_w, A_v[i] * v_w) for i in range(G)]))
    return M, A_inv, keep, rows


def kv_spectrum(attn, cfg: LlamaMLAConfig, mla: MLAArguments, svd_kw: dict, input_moment=None) -> torch.Tensor:
    """Singular values of the matrix the latent of this layer factorises (for `allocate_kv_ranks`)."""
    C = input_moment.double() if input_moment is not None else torch.eye(cfg.hidden_size, dtype=torch.float64)
    nope, _ = head_rows(cfg.head_dim, cfg.qk_rope_head_dim, mla.rope_init, cfg.rope_freq_indices)
    M = _kv_matrix(attn, cfg, mla, C, nope)[0]
    return _spectrum(M, sqrt_psd(C) if mla.init_method != "svd" else None, svd_kw)


def allocate_kv_ranks(spectra: dict[int, torch.Tensor], mean_rank: int, multiple: int) -> dict[int, int]:
    """Per-layer latent ranks summing to mean_rank x layers (CARE-style): every layer starts with `multiple`, then
    blocks of `multiple` ranks go, largest first, to where they remove the largest share of that layer's energy.
    Ranks are capped by each layer's matrix rank; a budget it cannot use goes to the next best blocks."""
    budget = mean_rank * len(spectra)
    if budget < multiple * len(spectra):
        raise ValueError(f"kv_lora_rank={mean_rank} is below rank_multiple={multiple}: no layer could get a rank")
    gains = []
    for layer, s in spectra.items():
        share = s.double().pow(2) / s.double().pow(2).sum().clamp_min(1e-300)
        for start in range(multiple, len(s), multiple):  # the first block is every layer's minimum
            gains.append((share[start : start + multiple].sum().item(), -start, layer, min(multiple, len(s) - start)))
    ranks = {layer: min(multiple, len(s)) for layer, s in spectra.items()}
    left = budget - sum(ranks.values())
    for _, _, layer, width in sorted(gains, reverse=True):  # per layer the blocks come in order: gains fall
        if left <= 0:
            break
        take = min(width, left)
        ranks[layer] += take
        left -= take
    return ranks


def latent_rms(down: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """sqrt(E[|c|^2] / r) for the latent c = down @ x with E[x x^T] = C (the identity without calibration data): the
    weight that gives an RMS-normalised latent the scale its up-projection was fitted for (exact for tokens whose
    latent has the typical rms; the refinement and training then fit through the norm)."""
    return torch.sqrt(torch.trace(down @ C @ down.T).clamp_min(1e-30) / down.shape[0])


def upcycle_layer(
    attn,
    cfg: LlamaMLAConfig,
    layer_idx: int,
    mla: MLAArguments,
    svd_kw: dict,
    input_moment: torch.Tensor | None = None,
    kv_rank: int | None = None,
) -> LayerFactors:
    """Factorise one Llama attention layer into the MLA parameters (`input_moment`: E[x x^T] of its input;
    `kv_rank`: this layer's latent rank when `allocate_kv_ranks` chose it)."""
    H, G, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    d_n, d_r, d_v, g = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, H // G
    nope, rope = head_rows(hd, d_r, mla.rope_init, cfg.rope_freq_indices)
    dynamic = layer_idx not in (0, cfg.num_hidden_layers - 1) or not mla.fixed_rank_first_last
    C = input_moment.double() if input_moment is not None else torch.eye(D, dtype=torch.float64)
    L = sqrt_psd(C) if mla.init_method in ("activation", "output") else None
    out = LayerFactors()
    Wq = attn.q_proj.weight.detach().to("cpu", torch.float64).view(H, hd, D)  # the SVDs run on svd_kw's device
    Wk = attn.k_proj.weight.detach().to("cpu", torch.float64).view(G, hd, D)

    # ---- shared RoPE key [d_r, D], and a per-head scale of the query's RoPE rows
    K_pe = Wk[:, rope]  # [G, d_r, D]
    q_scale = torch.ones(H, d_r, dtype=torch.float64)
    if mla.shared_rope_key == "mean" or G == 1:
        k_pe = K_pe.mean(dim=0)
    # per rotation pair: the direction across KV heads holding most key energy (a rotation that commutes with RoPE)
    else:
        k_pe = torch.empty(d_r, D, dtype=torch.float64)
        for a, b in rope_pairs(d_r, mla.rope_init):
            P = K_pe[:, [a, b]]  # [G, 2, D]
            M = sum(P[:, c] @ C @ P[:, c].T for c in range(2))  # [G, G] key second moment across heads
            u = torch.linalg.eigh(M)[1][:, -1]
            u = u * torch.sign(u.sum()) if u.sum() != 0 else u
            k_pe[[a, b]] = torch.einsum("g,gcd->cd", u, P)
            q_scale[:, [a, b]] = u.repeat_interleave(g)[:, None]  # query head h pairs with KV head h // g

    # ---- query: [H*hd, D] -> per head [no-RoPE | RoPE] -> q_b @ q_a
    Wq = torch.cat([Wq[:, nope], Wq[:, rope] * q_scale[:, :, None]], dim=1).reshape(H * (d_n + d_r), D)
    if cfg.q_lora_rank is None:
        out.tensors["q_proj.weight"] = Wq
    else:
        r_q = cfg.q_lora_rank
        if dynamic and mla.q_energy_ratio is not None:
            r_q = round_up(energy_rank(_spectrum(Wq, L, svd_kw), mla.q_energy_ratio), mla.rank_multiple, min(Wq.shape))
        up, down = _fit(Wq, r_q, L, svd_kw)
        out.tensors["q_b_proj.weight"], out.tensors["q_a_proj.weight"] = up, down
        out.q_rank = r_q

    # ---- key/value: [K_nope; V] per source KV head -> up @ down; up repeated to H heads as GQA does
    M, A_inv, keep, rows = _kv_matrix(attn, cfg, mla, C, nope)
    r_kv = kv_rank or cfg.kv_lora_rank
    if dynamic and mla.kv_energy_ratio is not None:
        r_kv = round_up(
            energy_rank(_spectrum(M, L, svd_kw), mla.kv_energy_ratio), mla.rank_multiple, min(D, H * (d_n + d_v))
        )
    r_eff = min(r_kv, min(M.shape))
    up, down = _fit(M, r_eff, L, svd_kw)  # [G*rows, r_eff], [r_eff, D]
    up = (A_inv @ up).view(G, rows, r_eff)[:, keep]  # back to unweighted key/value rows
    up = up.repeat_interleave(g, dim=0).reshape(H * (d_n + d_v), r_eff)
    up, down = up / math.sqrt(g), down * math.sqrt(g)  # = SVD of the head-repeated matrix, as in the paper
    if r_kv > r_eff:  # more latent dims than the source has: zero rows in down, fresh orthonormal dirs in up
        up = torch.cat([up, orthonormal_completion(up / up.norm(dim=0).clamp_min(1e-30), r_kv - r_eff)], dim=1)
        down = torch.cat([down, down.new_zeros(r_kv - r_eff, D)], dim=0)
    out.tensors["kv_a_proj_with_mqa.weight"] = torch.cat([down, k_pe], dim=0)  # [r_kv + d_r, D]
    out.tensors["kv_b_proj.weight"] = up  # [H*(d_n+d_v), r_kv]
    if cfg.use_lora_layer_norm:  # RMSNorm(c) = c / rms(c) * w: w = the latent's typical rms keeps its fitted scale
        out.tensors["kv_a_layernorm.weight"] = latent_rms(down, C).expand(r_kv).clone()
        if cfg.q_lora_rank is not None:
            out.tensors["q_a_layernorm.weight"] = (
                latent_rms(out.tensors["q_a_proj.weight"], C).expand(out.q_rank).clone()
            )
    out.kv_rank = r_kv
    return out


def upcycle(source, mla: MLAArguments, log=print, tokenizer=None):
    """Return a LlamaMLAForCausalLM built from the Llama causal LM `source` (which is left unchanged).

    `tokenizer` is needed only to read `calibration_dataset` (activation/output init, pca key, refinement)."""
    from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM

    freq_indices = resolve_rope_freq_indices(mla)
    cfg = build_config(source.config, mla, rope_freq_indices=freq_indices)  # validated before any SVD
    svd_device = ("cuda" if torch.cuda.is_available() else "cpu") if mla.svd_device == "auto" else mla.svd_device
    svd_kw = {"dtype": getattr(torch, mla.svd_dtype), "device": svd_device}
    dtype = next(source.parameters()).dtype
    moments, inputs = {}, {}
    if mla.calibration_dataset and (mla.init_method != "svd" or mla.shared_rope_key == "pca" or mla.refine_steps):
        if tokenizer is None:
            raise ValueError("calibration_dataset is set but no tokenizer was given to read it")
        blocks = calibration_token_blocks(
            tokenizer, mla.calibration_dataset, mla.calibration_samples, mla.calibration_seq_length
        )
        home = next(source.parameters()).device  # forward passes on the SVD device (a GPU where there is one)
        try:
            moments, inputs = attention_input_moments(source.to(svd_device), blocks, keep_inputs=mla.refine_steps > 0)
        finally:
            source.to(home)
        log(f"Calibration: {blocks.shape[0]} x {blocks.shape[1]} tokens of {mla.calibration_dataset} on {svd_device}")

    state = {k: v.detach().clone() for k, v in source.state_dict().items()}  # never share storage with the source
    layer_ranks, t0 = {}, time.time()
    mla_ids = sorted(cfg.mla_layer_ids)
    kv_ranks = {}
    if mla.allocate_kv_rank:
        spectra = {i: kv_spectrum(source.model.layers[i].self_attn, cfg, mla, svd_kw, moments.get(i)) for i in mla_ids}
        kv_ranks = allocate_kv_ranks(spectra, cfg.kv_lora_rank, mla.rank_multiple)
    for i in _progress(mla_ids, "SVD init"):
        attn = source.model.layers[i].self_attn
        f = upcycle_layer(attn, cfg, i, mla, svd_kw, moments.get(i), kv_ranks.get(i))
        layer_ranks[str(i)] = {"q_lora_rank": f.q_rank, "kv_lora_rank": f.kv_rank}
        prefix = f"model.layers.{i}.self_attn."
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
            state.pop(prefix + name)
        state.update({prefix + k: v.to(dtype) for k, v in f.tensors.items()})
    cfg = build_config(source.config, mla, layer_ranks, freq_indices)
    cfg._attn_implementation = source.config._attn_implementation

    with torch.device("meta"):
        model = LlamaMLAForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model)
    model.tie_weights()
    if mla.refine_steps:  # in at least float32 on the SVD device, one layer at a time
        _refine(source, model, mla_ids, inputs, mla, svd_device, log)
    model.to(dtype)
    model.generation_config = source.generation_config
    log(
        f"Upcycled {len(mla_ids)}/{cfg.num_hidden_layers} layers to MLA ({mla.rope_init} init) in "
        f"{time.time() - t0:.1f}s; "
        f"ranks per layer (q, kv): {_rank_summary(layer_ranks)}"
    )
    return model


def _refine(source, model, layer_ids, inputs, mla: MLAArguments, device, log):
    from train_mla.conversion.refine import refine_layer

    errors = []
    for i in _progress(layer_ids, "Refine"):
        src_attn, attn = source.model.layers[i].self_attn, model.model.layers[i].self_attn
        src_device = next(src_attn.parameters()).device
        attn.to(device, torch.promote_types(next(attn.parameters()).dtype, torch.float32))
        before, after = refine_layer(
            src_attn.to(device),
            attn,
            inputs[i].to(device),
            source.model.rotary_emb.to(device),
            mla.refine_steps,
            mla.refine_lr,
            mla.refine_batch_size,
            seed=i,
        )
        src_attn.to(src_device), source.model.rotary_emb.to(src_device), attn.cpu()
        errors.append((i, before, after))
    log(
        "Refined attention outputs (relative error before -> after): "
        + ", ".join(f"{i}: {b:.3f}->{a:.3f}" for i, b, a in errors)
    )


def _materialise_buffers(model):
    """Recompute the non-persistent RoPE buffers of a model built on the meta device."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf)


def _rank_summary(layer_ranks: dict) -> str:
    pairs = [(v["q_lora_rank"], v["kv_lora_rank"]) for v in layer_ranks.values()]
    return (
        str(pairs[0]) + " for all"
        if len(set(pairs)) == 1
        else ", ".join(f"{k}:{v}" for k, v in zip(layer_ranks, pairs))
    )


def _progress(items, desc):
    try:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False)
    except ImportError:  # pragma: no cover
        return items
