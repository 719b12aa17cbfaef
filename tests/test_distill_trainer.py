"""DistillTrainer on tiny models, in process: the student's forward runs under the Trainer's bf16 autocast (its
weights stay fp32), the optimizer updates fp32 weights, and evaluation reports the student's perplexity."""

import math

import torch

from conftest import tiny_llama


def _trainer(tmp_path, bf16: bool, **extra):
    from datasets import Dataset

    from train_mla.arguments import DistillConfig, MLAArguments
    from train_mla.data import PackedCollator
    from train_mla.distill_trainer import DistillTrainer
    from train_mla.upcycle import upcycle

    source = tiny_llama(seed=0)
    student = upcycle(source, MLAArguments(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 97, (32,), generator=g).tolist() for _ in range(8)]
    data = Dataset.from_dict({"input_ids": rows, "position_ids": [list(range(32))] * 8, "labels": rows})
    args = DistillConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                         save_strategy="no", report_to="none", use_cpu=True, bf16=bf16, remove_unused_columns=False,
                         compile_layers=False, disable_tqdm=True, **extra)
    return DistillTrainer(model=student, teacher=source, args=args, train_dataset=data, eval_dataset=data,
                          data_collator=PackedCollator(0, with_attention_mask=False)), student


def test_student_computes_under_bf16_autocast_with_fp32_weights(tmp_path):
    trainer, student = _trainer(tmp_path, bf16=True)
    seen = []
    hook = student.model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen), seen  # compute in bf16 ...
    assert all(p.dtype == torch.float32 for p in student.parameters())  # ... on fp32 master weights


def test_evaluation_logs_the_student_perplexity(tmp_path):
    trainer, student = _trainer(tmp_path, bf16=False)
    metrics = trainer.evaluate()
    assert {"eval_kl", "eval_ce", "eval_ppl"} <= set(metrics)
    assert math.isclose(metrics["eval_ppl"], math.exp(metrics["eval_ce"]), rel_tol=1e-3)
    from train_mla.distill_loss import distill_loss  # the same mean CE computed directly over the evaluation tokens

    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        h = student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        _, stats = distill_loss(h, h, student.lm_head, student.lm_head, batch["labels"])
    assert abs(metrics["eval_ce"] - stats["ce"].item()) < 1e-3
