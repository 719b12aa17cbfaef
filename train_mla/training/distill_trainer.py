"""A transformers Trainer whose loss is end-to-end distillation from a frozen teacher.

Both models run their decoder only; logits and the loss are produced chunk by chunk (`distill_loss`). Under
DeepSpeed ZeRO-3 the teacher is sharded like the student (trl's `prepare_deepspeed`), so an 8B teacher fits
beside a 1B student. With `compile_layers` every decoder layer of both models runs under `torch.compile`.
Logged (averaged over processes): loss, kl, ce, learning rate, grad norm, tokens/s/device; at each evaluation
eval_kl, eval_ce and eval_ppl (the student's token perplexity on the evaluation data, exp(eval_ce)).
"""

import logging
import math
import time

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from train_mla.training.distill_loss import distill_loss, fused_distill_loss

logger = logging.getLogger("train_mla")


def master_weight_dtypes(model, optimizer) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the model's trainable weights, dtype of the tensors the optimizer updates). The second is the master
    copy: the innermost torch optimizer under accelerate's and DeepSpeed's wrappers holds DeepSpeed's fp32
    partitions."""
    weight = next(p for p in model.parameters() if p.requires_grad)
    inner = optimizer
    while inner is not None:  # accelerate -> DeepSpeed ZeRO -> torch
        for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
            if getattr(inner, name, None):
                return weight.dtype, getattr(inner, name)[0].dtype
        if getattr(inner, "optimizer", None) is None:
            return weight.dtype, next(p for g in inner.param_groups for p in g["params"]).dtype
        inner = inner.optimizer
    raise ValueError("no optimizer")


def ramp_schedule_after(scheduler, start: int, steps: int):
    """Scale a LambdaLR schedule by min(1, (t - start + 1) / steps) from step `start` on. The wrappers are plain
    functions, which LambdaLR leaves out of its saved state: a later checkpoint holds the schedule itself, and one
    resumed with its Adam moments needs no ramp."""
    if not hasattr(scheduler, "lr_lambdas"):
        raise ValueError(
            f"continuation_warmup_steps needs a LambdaLR schedule (linear, cosine, warmup_stable_decay, ...), "
            f"not {type(scheduler).__name__}: set continuation_warmup_steps: 0"
        )

    def ramped(schedule):
        return lambda t: schedule(t) * min(1.0, (t - start + 1) / steps)

    scheduler.lr_lambdas = [ramped(f) for f in scheduler.lr_lambdas]


class DistillTrainer(Trainer):
    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        if self.accelerator.distributed_type == DistributedType.MULTI_GPU:
            raise ValueError(
                "plain DDP is not supported for distillation: launch with deepspeed_zero3.yaml "
                "(DeepSpeed, any number of GPUs) or as a single process."
            )
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            teacher = teacher.to(self.args.device)
        self.teacher = teacher
        if self.args.teacher_fp8:
            self._teacher_to_fp8()
        if (
            self.args.loss_implementation == "liger"
            and self.is_deepspeed_enabled
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise ValueError(
                "loss_implementation: liger reads the heads' weights directly, which ZeRO-3 partitions: "
                "use --zero_stage 2 (one GPU, or a student that fits each GPU) or loss_implementation: chunked"
            )
        if self.args.compile_layers:
            if self.is_deepspeed_enabled:
                import deepspeed

                deepspeed.utils.nvtx.enable_nvtx = (
                    False  # its range wrappers break graphs (as DeepSpeed's own compile does)
                )
            for m in (self.model, self.teacher):
                for layer in self._bare(m).model.layers:
                    layer.compile()  # layers share one graph (modules are inlined): one compilation per model
        self.loss_is_scaled_for_ga = False  # the loss is a per-micro-batch token mean: let the Trainer divide by GA
        self._window = self._new_window()
        self._eval_window = self._new_window()

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A weights-only checkpoint (`checkpoint_transfer pack --weights_only`) has no optimizer state: the scheduler
        continues at its step and Adam's moments start afresh, under a learning rate ramped up over
        `continuation_warmup_steps` (Adam's first steps move every weight by about the whole rate)."""
        from pathlib import Path

        from train_mla.training.run_folder import CONTINUATION

        if checkpoint is None or not (Path(checkpoint) / CONTINUATION).is_file():
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))
        start, ramp = self.lr_scheduler.last_epoch, self.args.continuation_warmup_steps
        scheduled = self.lr_scheduler.get_last_lr()[0]
        if ramp:
            ramp_schedule_after(self.lr_scheduler, start, ramp)
        self.lr_scheduler.last_epoch = start - 1
        self.lr_scheduler.step()  # back at `start`: the optimizer's rates and get_last_lr() (what the Trainer logs)
        logger.warning(
            f"{checkpoint} is a weights-only checkpoint: training continues at step {start} with its learning rate "
            f"({scheduled:.3g}) and data position; the optimizer's moments start afresh"
            + (f", the rate ramped up from {self.lr_scheduler.get_last_lr()[0]:.3g} over {ramp} steps" if ramp else "")
        )

    def _teacher_to_fp8(self):
        from train_mla.training.fp8_teacher import quantize_teacher_fp8
        from train_mla.training.hardware import check_teacher_fp8

        zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
        check_teacher_fp8(self.args, self.args.device.type == "cuda", zero_stage)  # train_distill.py checked it first
        n = quantize_teacher_fp8(self._bare(self.teacher))
        logger.info(f"Teacher: {n} decoder linear layers in FP8 (e4m3, row-wise scales); head and embeddings bf16")

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not getattr(self, "_precision_logged", False):  # once: what the optimizer really updates
            self._precision_logged = True
            weights, master = master_weight_dtypes(model, self.optimizer)
            logger.info(
                f"Precision: trained weights {weights} (compute: {'bf16 autocast' if self.args.bf16 else weights}), "
                f"optimizer master copy {master}, teacher {next(self.teacher.parameters()).dtype}"
            )
            if master != torch.float32:
                logger.warning("The optimizer updates non-fp32 weights: small updates will round away.")
        return loss

    @staticmethod
    def _new_window():
        return {"kl": 0.0, "ce": 0.0, "n": 0, "tokens": 0, "ce_tokens": 0, "t0": time.perf_counter()}

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
        # the inner model bypasses the forward that accelerate wraps in autocast; the student's LM head computes in
        # bf16 too (a [tokens, 128k] product in fp32 cost a third of the 1B step), its weights staying fp32
        with self.accelerator.autocast():
            s_hidden = student.model(**forward, use_cache=False).last_hidden_state  # [B, L, D]
            if args.loss_implementation == "liger" and model.training and torch.is_grad_enabled():
                loss, stats = fused_distill_loss(
                    s_hidden,
                    t_hidden,
                    student.lm_head,
                    teacher.lm_head,
                    inputs["labels"],
                    kl_weight=args.kl_weight,
                    temperature=args.temperature,
                    compute_dtype=torch.bfloat16 if args.bf16 else None,
                )
            else:
                loss, stats = distill_loss(
                    s_hidden,
                    t_hidden if t_hidden is not None else s_hidden.detach(),
                    student.lm_head,
                    teacher.lm_head,
                    inputs["labels"],
                    kl_weight=args.kl_weight,
                    ce_weight=args.ce_weight,
                    temperature=args.temperature,
                    chunk_size=args.loss_chunk_size,
                )
        # training logs the mean of the per-step means; evaluation the mean over all of its tokens
        w, k_w, c_w = (
            (self._window, 1, 1) if model.training else (self._eval_window, stats["tokens"], stats["ce_tokens"])
        )
        w["kl"] += float(stats["kl"]) * k_w
        w["ce"] += float(stats["ce"]) * c_w
        w["n"] += 1
        w["tokens"] += stats["tokens"]
        w["ce_tokens"] += stats["ce_tokens"]
        return (loss, {"loss": loss}) if return_outputs else loss

    def _reduced(self, w):
        sums = torch.tensor(
            [w["kl"], w["ce"], w["n"], w["tokens"], w["ce_tokens"]], dtype=torch.float64, device=self.args.device
        )
        return self.accelerator.reduce(sums, reduction="sum").tolist()

    def log(self, logs, start_time=None):
        # every process logs at the same steps, so the sums can be reduced here
        if "loss" in logs and self._window["n"]:  # training logs
            now = time.perf_counter()
            kl, ce, n, tokens, _ = self._reduced(self._window)
            logs["kl"] = round(kl / n, 5)
            if not math.isnan(ce):  # loss_implementation: liger computes no CE
                logs["ce"] = round(ce / n, 5)
            logs["tokens_per_second_per_device"] = round(
                tokens / self.accelerator.num_processes / (now - self._window["t0"]), 1
            )
            self._window = self._new_window()
        if "eval_loss" in logs and self._eval_window["n"]:  # evaluation logs
            kl, ce, _, tokens, ce_tokens = self._reduced(self._eval_window)
            logs["eval_kl"] = round(kl / max(tokens, 1), 5)
            logs["eval_ce"] = round(ce / max(ce_tokens, 1), 5)
            logs["eval_ppl"] = round(math.exp(min(logs["eval_ce"], 50.0)), 3)
            self._eval_window = self._new_window()
            self._window["t0"] = time.perf_counter()  # evaluation time does not count against training tokens/s
        super().log(logs, start_time)
