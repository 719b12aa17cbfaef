"""Stage-1 loss: kl_weight * KL(teacher || student) at temperature T + ce_weight * next-token cross-entropy.

Both terms are averaged over real tokens only (labels != -100; padding never counts). Logits are computed in
chunks of `chunk_size` tokens under activation checkpointing, so with a 128k vocabulary no full
[tokens, vocab] fp32 tensor exists for either model: only one chunk's logits live at a time, in the forward
and again in the backward. `fused_distill_loss` is the same KL term through liger-kernel's fused linear JSD
(`loss_implementation: liger`), which computes the head's gradients in its forward instead of recomputing the logits.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _upcast(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_terms(s_hidden, t_hidden, targets, student_head, teacher_head, temperature, with_kl):
    """(KL sum, CE sum) of one chunk. s_hidden [n, D], t_hidden [n, D_t], targets [n] (-100 = no CE)."""
    s_logits = _upcast(student_head(s_hidden))  # [n, V], at least fp32
    s_logp = F.log_softmax(s_logits, dim=-1)
    ce = -s_logp.gather(1, targets.clamp_min(0)[:, None]).squeeze(1).masked_fill(targets == -100, 0).sum()
    kl = s_logits.new_zeros(())
    if with_kl:
        with torch.no_grad():
            t_logp = F.log_softmax(_upcast(teacher_head(t_hidden)) / temperature, dim=-1)  # [n, V]
        s_logp_t = s_logp if temperature == 1.0 else F.log_softmax(s_logits / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp_t)).sum()
    return kl, ce


def distill_loss(
    student_hidden,
    teacher_hidden,
    student_head,
    teacher_head,
    labels,
    *,
    kl_weight=1.0,
    ce_weight=0.0,
    temperature=1.0,
    chunk_size=1024,
):
    """Returns (loss, stats). hidden [B, L, D] are the final (normed) hidden states, labels [B, L].

    KL is taken at every position holding a real token (labels != -100); CE predicts labels[t + 1] from t.
    stats: the unweighted mean KL (at temperature T) and CE, detached, and the token counts of each (tokens, ce_tokens).
    """
    B, L, _ = student_hidden.shape
    targets = torch.full_like(labels, -100)  # CE at t needs real tokens at t and t + 1
    targets[:, :-1] = labels[:, 1:].masked_fill(labels[:, :-1] == -100, -100)
    idx = (labels != -100).reshape(-1).nonzero().squeeze(1)  # positions that count
    s = student_hidden.reshape(B * L, -1)[idx]  # [N, D]
    t = teacher_hidden.reshape(B * L, -1)[idx] if kl_weight else None  # [N, D_t]
    tgt = targets.reshape(-1)[idx]  # [N]
    n_kl, n_ce = idx.numel(), int((tgt != -100).sum())

    n_chunks = -(-n_kl // chunk_size)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # ZeRO-3 gathers the head weights at every call: all ranks must make the same number of calls
        count = torch.tensor([n_chunks], device=student_hidden.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        n_chunks = int(count.item())
    kl_sum = ce_sum = _upcast(student_hidden.new_zeros(()))
    for c in range(n_chunks):  # chunks past this rank's tokens are empty but still call the heads
        sl = slice(c * chunk_size, (c + 1) * chunk_size)
        args = (
            s[sl],
            t[sl] if t is not None else None,
            tgt[sl],
            student_head,
            teacher_head,
            temperature,
            bool(kl_weight),
        )
        if torch.is_grad_enabled() and s.requires_grad:
            kl, ce = checkpoint(_chunk_terms, *args, use_reentrant=False)  # chunk logits are recomputed in backward
        else:
            kl, ce = _chunk_terms(*args)
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    kl_mean, ce_mean = kl_sum / max(n_kl, 1), ce_sum / max(n_ce, 1)
    loss = kl_weight * temperature**2 * kl_mean + ce_weight * ce_mean
    stats = {"kl": kl_mean.detach(), "ce": ce_mean.detach(), "tokens": n_kl, "ce_tokens": n_ce}
    return loss, stats


def fused_distill_loss(
    student_hidden,
    teacher_hidden,
    student_head,
    teacher_head,
    labels,
    *,
    kl_weight=1.0,
    temperature=1.0,
    compute_dtype=None,
):
    """distill_loss's KL term (ce_weight 0) through liger-kernel's LigerFusedLinearJSD: beta 0 is KL(teacher ||
    student), averaged over the rows it gets, here the positions holding a real token; logits at temperature T, the
    loss scaled by T^2 as above. For training (the heads' weights get their gradients from its own backward); stats as
    distill_loss's, without CE (nan, ce_tokens 0). The heads are used through their weights: not under ZeRO-3.
    compute_dtype (bf16 training): both products in that dtype; the fp32 weight gets its gradient through the cast."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    B, L, _ = student_hidden.shape
    idx = (labels != -100).reshape(-1).nonzero().squeeze(1)  # positions that count
    if idx.numel() == 0:
        zero = student_hidden.sum() * 0.0
        return zero, {"kl": zero.detach(), "ce": torch.tensor(float("nan")), "tokens": 0, "ce_tokens": 0}
    s = student_hidden.reshape(B * L, -1)[idx]  # [N, D]
    t = teacher_hidden.reshape(B * L, -1)[idx]  # [N, D_t]
    w_s, w_t = student_head.weight, teacher_head.weight
    if compute_dtype is not None:
        s, t, w_s, w_t = (x.to(compute_dtype) for x in (s, t, w_s, w_t))
    kl = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)(s, w_s, t, w_t, None)
    loss = kl_weight * temperature**2 * kl
    return loss, {"kl": kl.detach(), "ce": torch.tensor(float("nan")), "tokens": idx.numel(), "ce_tokens": 0}
