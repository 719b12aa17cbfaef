"""Layer-wise refinement of an upcycled model: fit each MLA layer's output to its source attention's output.

The closed-form init (SVD, activation-aware fit) minimises a proxy: how well the low-rank projections reproduce
the source's keys and values. What the next layer sees is the attention *output*, a softmax away from those
projections. Here each MLA layer is trained on its own, with Adam, to reproduce the source GQA layer's output on
the calibration inputs of that layer (the source model's own hidden states), by relative mean squared error.
Layers are independent (no end-to-end backward), so it costs a few seconds per layer on a GPU and is
deterministic on CPU (fixed data, fixed sample order).
"""

import contextlib
import math

import torch


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||out - target||^2 / ||target||^2 over the batch."""
    return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


@contextlib.contextmanager
def causal_sdpa(*modules):
    """Attention layers called on their own get no mask: SDPA is then causal, but flex and eager attention would
    let every token see the whole block. Inside this block the modules' configs say SDPA (the same attention)."""
    configs = list({id(m.config): m.config for m in modules}.values())
    was = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "sdpa"
    try:
        yield
    finally:
        for c, impl in zip(configs, was):
            c._attn_implementation = impl


def refine_layer(
    source_attn, mla_attn, x: torch.Tensor, rotary_emb, steps: int, lr: float, batch_size: int, seed: int
) -> tuple[float, float]:
    """Train `mla_attn` (in place) so that mla_attn(x) ~ source_attn(x) on x [N, S, D]; returns the relative
    error before and after, measured on all of x. `rotary_emb` gives the source layer its cos/sin."""
    with causal_sdpa(source_attn, mla_attn):
        return _refine_layer(source_attn, mla_attn, x, rotary_emb, steps, lr, batch_size, seed)


def _refine_layer(source_attn, mla_attn, x, rotary_emb, steps, lr, batch_size, seed):
    N, S, _ = x.shape
    device = next(mla_attn.parameters()).device
    positions = torch.arange(S, device=device)[None]
    src_dtype = next(source_attn.parameters()).dtype

    @torch.no_grad()
    def source_out(xb):
        cos, sin = rotary_emb(xb.to(src_dtype), positions)
        rope = (cos.expand(len(xb), -1, -1), sin.expand(len(xb), -1, -1))
        return source_attn(hidden_states=xb.to(src_dtype), position_embeddings=rope, attention_mask=None)[0].to(
            xb.dtype
        )

    def mla_out(xb):
        return mla_attn(
            hidden_states=xb, position_embeddings=None, attention_mask=None, position_ids=positions.expand(len(xb), -1)
        )[0]

    target = torch.cat([source_out(x[i : i + batch_size]) for i in range(0, N, batch_size)])  # [N, S, D]

    @torch.no_grad()
    def error():
        return relative_error(
            torch.cat([mla_out(x[i : i + batch_size]) for i in range(0, N, batch_size)]), target
        ).item()

    before = error()
    params = list(mla_attn.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randperm(N, generator=g)[:batch_size].to(x.device)
            loss = relative_error(mla_out(x[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    for p, w in zip(params, was):
        p.requires_grad_(w)
    return before, error()
