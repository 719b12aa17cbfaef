"""A transformers Trainer whose loss is end-to-end distillation from a frozen teacher.

Both models run their decoder only; logits and the loss are produced chunk by chunk (`distill_loss`). Under
DeepSpeed ZeRO-3 the teacher is sharded like the student (trl's `prepare_deepspeed`), so an 8B teacher fits
beside a 1B student. Logged (averaged over processes): loss, kl, ce, learning rate, grad norm, tokens/s/device.
"""

import time

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from .distill_loss import distill_loss


class DistillTrainer(Trainer):
    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        if self.accelerator.distributed_type == DistributedType.MULTI_GPU:
            raise ValueError("plain DDP is not supported for distillation: launch with deepspeed_zero3.yaml "
                             "(DeepSpeed, any number of GPUs) or as a single process.")
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            teacher = teacher.to(self.args.device)
        self.teacher = teacher
        self.loss_is_scaled_for_ga = False  # the loss is a per-micro-batch token mean: let the Trainer divide by GA
        self._window = {"kl": 0.0, "ce": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}

    @staticmethod
    def _bare(model):
        return model.module if hasattr(model, "module") else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        student, teacher = self._bare(model), self._bare(self.teacher)
        if args.kl_weight:
            with torch.no_grad():
                t_hidden = teacher.model(**forward, use_cache=False).last_hidden_state  # [B, L, D_t]
        else:
            t_hidden = None
        s_hidden = student.model(**forward, use_cache=False).last_hidden_state  # [B, L, D]
        loss, stats = distill_loss(
            s_hidden, t_hidden if t_hidden is not None else s_hidden.detach(), student.lm_head, teacher.lm_head,
            inputs["labels"], kl_weight=args.kl_weight, ce_weight=args.ce_weight, temperature=args.temperature,
            chunk_size=args.loss_chunk_size,
        )
        if model.training:
            w = self._window
            w["kl"] += float(stats["kl"])
            w["ce"] += float(stats["ce"])
            w["n"] += 1
            w["tokens"] += stats["tokens"]
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs, start_time=None):
        w = self._window
        if "loss" in logs and w["n"]:  # training logs: every process gets here, so the sums can be reduced
            now = time.perf_counter()
            sums = torch.tensor([w["kl"], w["ce"], w["n"], w["tokens"]], dtype=torch.float64, device=self.args.device)
            kl, ce, n, tokens = self.accelerator.reduce(sums, reduction="sum").tolist()
            logs["kl"] = round(kl / n, 5)
            logs["ce"] = round(ce / n, 5)
            logs["tokens_per_second_per_device"] = round(tokens / self.accelerator.num_processes / (now - w["t0"]), 1)
            self._window = {"kl": 0.0, "ce": 0.0, "n": 0, "tokens": 0, "t0": now}
        super().log(logs, start_time)
