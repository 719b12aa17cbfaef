"""Second moments of each attention layer's input on calibration text, for activation-aware initialisation.

For layer l the attention input x (after input_layernorm) gives C_l = sum_t x_t x_t^T / n. A projection W then
has output energy tr(W C_l W^T), and the best rank-r approximation of W *on this data* is U_r U_r^T W with U_r
the top left singular vectors of W C_l^{1/2}. Deterministic: fixed text, fixed order, float64 sums.
"""

import torch


def calibration_token_blocks(tokenizer, source: str, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] token ids from a local text/jsonl file (the first rows, in order)."""
    from train_mla.training.data import load_source, tokenize_document

    if not source:
        raise ValueError("calibration_dataset is empty: activation-aware init needs calibration text")
    splits = load_source(source, ["train", "test"])
    ds = next(iter(splits.values()))
    ids: list[int] = []
    for row in ds:
        ids += tokenize_document(row, tokenizer)
        if len(ids) >= samples * seq_len:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"calibration_dataset {source!r} holds {len(ids)} tokens, fewer than one block of "
            f"calibration_seq_length={seq_len}"
        )
    n = min(n, samples)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def attention_input_moments(
    model, blocks: torch.Tensor, batch_size: int = 4, keep_inputs: bool = False
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """({layer index: C_l [D, D] float64}, {layer index: the inputs [N, S, D] (at least float32, on CPU), only with
    keep_inputs, for `refine.py`}) from forward passes of the source model over `blocks`."""
    if blocks.numel() == 0:
        raise ValueError("no calibration tokens")
    sums, counts, hooks, inputs = {}, {}, [], {}
    device = next(model.parameters()).device

    def hook(idx):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if keep_inputs:
                inputs.setdefault(idx, []).append(x.to(torch.promote_types(x.dtype, torch.float32)).cpu())
            x = x.reshape(-1, x.shape[-1]).double()
            sums[idx] = sums.get(idx, 0) + x.T @ x
            counts[idx] = counts.get(idx, 0) + x.shape[0]

        return fn

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True))
    try:
        for start in range(0, blocks.shape[0], batch_size):
            model(blocks[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: (sums[i] / counts[i]).cpu() for i in sums}, {i: torch.cat(v) for i, v in inputs.items()}


def sqrt_psd(C: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Symmetric square root of a PSD matrix, with a small ridge so rare directions are not ignored entirely."""
    C = C.double()
    evals, evecs = torch.linalg.eigh(C + eps * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype))
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
