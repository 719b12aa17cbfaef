"""The FP8 teacher: Float8Linear against a float64 product of its own quantised operands (the scaling and the
matrix product) and against the exact layer (the quantisation error), and a whole tiny Llama whose decoder runs in
FP8 against the original (distribution change), and in DistillTrainer."""

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from train_mla.training.fp8_teacher import E4M3_MAX, Float8Linear, quantize_rows, quantize_teacher_fp8


def test_row_quantisation_scales_each_row_to_the_e4m3_range_and_round_trips():
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-3, 2, 8)[:, None]  # rows five decades apart
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert torch.allclose(q.float().abs().amax(-1), torch.full((8,), E4M3_MAX))  # every row's max lands on 448
    back = q.float() * scale
    big = x.abs() > x.abs().amax(-1, keepdim=True) / 64  # e4m3 normals: 3 mantissa bits, relative step 2^-3
    assert ((back - x).abs() <= x.abs() * 2**-4 + 1e-12)[big].all()


def test_float8_linear_is_the_scaled_product_of_its_quantised_operands():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    fp8 = Float8Linear(lin)
    xq, xs = quantize_rows(x.reshape(-1, 64))
    ref = (xq.double() * xs.double()) @ (fp8.weight_fp8.double() * fp8.weight_scale.double().T).T + lin.bias.double()
    out = fp8(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().reshape(-1, 48), ref, atol=1e-4, rtol=1e-4)
    exact = lin(x)
    rel = ((out - exact).norm() / exact.norm()).detach()
    assert 1e-4 < float(rel) < 0.05  # really quantised, and only by e4m3's rounding


def test_widths_not_divisible_by_16_are_refused():
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear(nn.Linear(60, 48))


def test_teacher_decoder_in_fp8_changes_the_distribution_little():
    teacher = tiny_llama(seed=0).requires_grad_(False)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = teacher(ids).logits.log_softmax(-1)
        n = quantize_teacher_fp8(teacher)
        out = teacher(ids).logits.log_softmax(-1)
    assert n == 3 * 7  # q, k, v, o, gate, up, down in each of 3 layers
    assert isinstance(teacher.model.layers[0].self_attn.q_proj, Float8Linear)
    assert type(teacher.lm_head) is nn.Linear  # the head stays as it was
    kl = float((ref.exp() * (ref - out)).sum(-1).mean())
    to_uniform = float((ref.exp() * (ref + torch.log(torch.tensor(97.0)))).sum(-1).mean())  # 3.1 nats
    # this random model is far more chaotic than a trained one (its KL is 0.12 nats); a wrong scale or a dropped
    # layer would land near the uniform distribution's KL or lose the argmax
    assert 0 < kl < 0.1 * to_uniform, (kl, to_uniform)
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.75


def test_a_trainable_model_is_refused():
    with pytest.raises(ValueError, match="frozen"):
        quantize_teacher_fp8(tiny_llama(seed=0))


def test_distill_trainer_trains_against_an_fp8_teacher(tmp_path):
    from test_distill_trainer import _trainer

    trainer, student = _trainer(tmp_path, bf16=False, teacher_fp8=True)
    assert isinstance(trainer.teacher.model.layers[1].mlp.down_proj, Float8Linear)
    before = [p.detach().clone() for p in student.parameters()]
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
