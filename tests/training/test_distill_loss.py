"""The chunked distillation loss, and liger-kernel's fused one, equal a plain full-logit computation, in value and
gradient."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import run_under_triton_interpreter

from train_mla.training.distill_loss import distill_loss


def _reference(s_hidden, t_hidden, s_head, t_head, labels, kl_weight, ce_weight, T):
    s_logits, t_logits = s_head(s_hidden), t_head(t_hidden)  # [B, L, V]
    real = labels != -100
    p_t = F.softmax(t_logits / T, -1)
    kl_tok = (p_t * (F.log_softmax(t_logits / T, -1) - F.log_softmax(s_logits / T, -1))).sum(-1)  # [B, L]
    kl = kl_tok[real].mean() * T**2
    both = real[:, :-1] & real[:, 1:]  # a prediction from a real token of a real token
    ce = F.cross_entropy(s_logits[:, :-1][both], labels[:, 1:][both])
    return kl_weight * kl + ce_weight * ce


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, D, Dt, V = 3, 11, 8, 12, 50
    s_hidden = torch.randn(B, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(B, L, Dt, generator=g, dtype=torch.float64)
    s_head = torch.nn.Linear(D, V, bias=False).double()
    t_head = torch.nn.Linear(Dt, V, bias=False).double()
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[1, 7:] = -100  # padding
    labels[2, :3] = -100
    return s_hidden, t_hidden, s_head, t_head, labels


@pytest.mark.parametrize(
    "kl_weight, ce_weight, T, chunk",
    [(1.0, 0.0, 1.0, 4), (0.7, 0.3, 2.0, 5), (1.0, 1.0, 1.0, 1000), (0.0, 1.0, 1.0, 3)],
)
def test_chunked_equals_unchunked_value_and_gradient(kl_weight, ce_weight, T, chunk):
    s_hidden, t_hidden, s_head, t_head, labels = _setup()
    ref = _reference(s_hidden, t_hidden, s_head, t_head, labels, kl_weight, ce_weight, T)
    g_ref = torch.autograd.grad(ref, [s_hidden, s_head.weight])
    loss, stats = distill_loss(
        s_hidden,
        t_hidden,
        s_head,
        t_head,
        labels,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        temperature=T,
        chunk_size=chunk,
    )
    g = torch.autograd.grad(loss, [s_hidden, s_head.weight])
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert stats["tokens"] == int((labels != -100).sum())


def test_padding_does_not_change_the_loss():
    s_hidden, t_hidden, s_head, t_head, labels = _setup()
    loss, _ = distill_loss(s_hidden, t_hidden, s_head, t_head, labels, ce_weight=0.5, chunk_size=4)
    # change what sits at padded positions: hidden states and the padding token itself
    s2, t2 = s_hidden.detach().clone(), t_hidden.clone()
    pad = labels == -100
    s2[pad], t2[pad] = 100.0, -100.0
    loss2, _ = distill_loss(s2, t2, s_head, t_head, labels, ce_weight=0.5, chunk_size=4)
    torch.testing.assert_close(loss.detach(), loss2, atol=1e-10, rtol=0)
    # adding more padding to a row does not rescale the mean
    wider = torch.cat([labels, torch.full((3, 5), -100)], 1)
    s3 = torch.cat([s_hidden.detach(), torch.randn(3, 5, 8, dtype=torch.float64)], 1)
    t3 = torch.cat([t_hidden, torch.randn(3, 5, 12, dtype=torch.float64)], 1)
    loss3, _ = distill_loss(s3, t3, s_head, t_head, wider, ce_weight=0.5, chunk_size=4)
    torch.testing.assert_close(loss.detach(), loss3, atol=1e-10, rtol=0)


def test_identical_models_have_zero_kl():
    s_hidden, _, s_head, _, labels = _setup()
    loss, stats = distill_loss(s_hidden, s_hidden.detach(), s_head, s_head, labels, chunk_size=7)
    assert abs(loss.item()) < 1e-12 and abs(stats["kl"].item()) < 1e-12


_FUSED_CHECK = r"""
import sys
sys.path[:0] = [{repo!r}, *{tests!r}]
import torch
from test_distill_loss import _reference, _setup
from train_mla.training.distill_loss import fused_distill_loss
worst = 0.0
for kl_weight, T in ((1.0, 1.0), (0.7, 2.0)):
    s_hidden, t_hidden, s_head, t_head, labels = (x.float() if torch.is_tensor(x) and x.is_floating_point() else x
                                                  for x in _setup())
    s_head, t_head = s_head.float(), t_head.float()
    s_hidden = s_hidden.detach().requires_grad_(True)
    ref = _reference(s_hidden, t_hidden, s_head, t_head, labels, kl_weight, 0.0, T)
    g_ref = torch.autograd.grad(ref, [s_hidden, s_head.weight])
    loss, stats = fused_distill_loss(s_hidden, t_hidden, s_head, t_head, labels, kl_weight=kl_weight, temperature=T)
    g = torch.autograd.grad(loss, [s_hidden, s_head.weight])
    assert stats["tokens"] == int((labels != -100).sum()) and stats["ce_tokens"] == 0
    worst = max(worst, abs(loss.item() - ref.item()) / abs(ref.item()),
                *((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(g, g_ref)))
print("worst relative difference", worst)
"""


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_fused_loss_equals_the_reference_kl_value_and_gradient():
    # liger's kernels run under Triton's CPU interpreter; TRITON_INTERPRET must be set before triton is imported
    out = run_under_triton_interpreter(_FUSED_CHECK)
    assert float(out.split()[-1]) < 1e-4, out


def test_liger_loss_settings_are_checked():
    from train_mla.training.arguments import DistillConfig

    with pytest.raises(ValueError, match="ce_weight: 0"):
        DistillConfig(output_dir="unused", loss_implementation="liger", ce_weight=0.5, use_cpu=True)
    with pytest.raises(ValueError, match="chunked, liger"):
        DistillConfig(output_dir="unused", loss_implementation="fused", use_cpu=True)
