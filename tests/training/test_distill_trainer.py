"""DistillTrainer on tiny models, in process: the student's forward runs under the Trainer's bf16 autocast (its
weights stay fp32), the optimizer updates fp32 weights, and evaluation reports the student's perplexity."""

import importlib.util
import math

import pytest
import torch
from conftest import run_under_triton_interpreter, tiny_llama


def _trainer(tmp_path, bf16: bool, **extra):
    from datasets import Dataset

    from train_mla.conversion.gqa_to_mla import upcycle
    from train_mla.training.arguments import DistillConfig, MLAArguments
    from train_mla.training.data import PackedCollator
    from train_mla.training.distill_trainer import DistillTrainer

    source = tiny_llama(seed=0)
    student = upcycle(source, MLAArguments(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 97, (32,), generator=g).tolist() for _ in range(8)]
    data = Dataset.from_dict({"input_ids": rows, "position_ids": [list(range(32))] * 8, "labels": rows})
    args = DistillConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=bf16,
        remove_unused_columns=False,
        compile_layers=False,
        disable_tqdm=True,
        **extra,
    )
    return DistillTrainer(
        model=student,
        teacher=source,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=PackedCollator(0, with_attention_mask=False),
    ), student


def test_student_computes_under_bf16_autocast_with_fp32_weights(tmp_path):
    trainer, student = _trainer(tmp_path, bf16=True)
    seen, head = [], []
    hook = student.model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    head_hook = student.lm_head.register_forward_hook(lambda m, i, o: head.append(o.dtype))  # inside the loss
    trainer.train()
    hook.remove()
    head_hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen), seen  # compute in bf16, the LM head's too ...
    assert head and all(d == torch.bfloat16 for d in head), head
    assert all(p.dtype == torch.float32 for p in student.parameters())  # ... on fp32 master weights


def test_evaluation_logs_the_student_perplexity(tmp_path):
    trainer, student = _trainer(tmp_path, bf16=False)
    metrics = trainer.evaluate()
    assert {"eval_kl", "eval_ce", "eval_ppl"} <= set(metrics)
    assert math.isclose(metrics["eval_ppl"], math.exp(metrics["eval_ce"]), rel_tol=1e-3)
    from train_mla.training.distill_loss import (
        distill_loss,
    )  # the same mean CE computed directly over the evaluation tokens

    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        h = student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        _, stats = distill_loss(h, h, student.lm_head, student.lm_head, batch["labels"])
    assert abs(metrics["eval_ce"] - stats["ce"].item()) < 1e-3


_LIGER_TRAINING = r"""
import sys, tempfile
sys.path[:0] = [{repo!r}, *{tests!r}]
import torch
from pathlib import Path
from test_distill_trainer import _trainer
updates = {{}}
for impl in ("chunked", "liger"):
    trainer, student = _trainer(Path(tempfile.mkdtemp()), bf16=False, loss_implementation=impl, optim="sgd")
    before = {{n: p.detach().clone() for n, p in student.named_parameters()}}
    trainer.train()
    updates[impl] = {{n: p.detach() - before[n] for n, p in student.named_parameters()}}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
trainer, student = _trainer(Path(tempfile.mkdtemp()), bf16=True, loss_implementation="liger", optim="sgd")
before = {{n: p.detach().clone() for n, p in student.named_parameters()}}
trainer.train()  # bf16 products (compute_dtype), fp32 weights updated through the casts
assert all(p.dtype == torch.float32 for p in student.parameters())
assert not torch.equal(before["lm_head.weight"], student.lm_head.weight.detach())
diff = sum((updates["liger"][n] - u).pow(2).sum() for n, u in updates["chunked"].items()).sqrt()
print("relative update difference", (diff / sum(u.pow(2).sum() for u in updates["chunked"].values()).sqrt()).item())
"""


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_loss_trains_the_student_as_the_chunked_loss_does():
    # two SGD steps through the Trainer (tied head included): the same weight updates with either loss, over all
    # weights (SGD: an update is the gradient, where Adam would magnify rounding in near-zero gradients; an update of
    # a weight near 1 is itself only resolved to fp32's 1.2e-7)
    out = run_under_triton_interpreter(_LIGER_TRAINING)
    assert float(out.split()[-1]) < 1e-4, out
