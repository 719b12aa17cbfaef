"""Fitting a recipe to the machine it runs on: attention, loss and FP8 teacher settings that a CPU or ZeRO-3 cannot run
are switched to the equivalent that can, with a line that says so, or refused before any model loads."""

from train_mla.training.recipe import RecipeError


def fit_attention_to_machine(
    model_args, on_gpu: bool | None = None, zero_stage: int | None = None, compiled: bool = False
) -> str | None:
    """flex_attention has no backward pass on a CPU: off a GPU (none found, or use_cpu) the same attention runs
    through SDPA (same document masks, same results). Nor does it compile inside ZeRO-3's hooked layers (Inductor's
    `LoweringException: ... 'floor' and 'Add'` on the H200, torch 2.11: docs/benchmarks.md, stage-1 training step
    train_zero3_flex_failure.log): with compiled layers under ZeRO-3, SDPA too. Returns the line that says so, or None
    when nothing changed."""
    import torch

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if getattr(model_args, "attn_implementation", None) != "flex_attention":
        return None
    if not on_gpu:
        model_args.attn_implementation = "sdpa"
        return "Training on the CPU: attn_implementation flex_attention -> sdpa (flex attention trains only on a GPU)"
    if zero_stage == 3 and compiled:
        model_args.attn_implementation = "sdpa"
        return (
            "ZeRO-3 with compiled layers: attn_implementation flex_attention -> sdpa (the two fail to compile "
            "together; on one GPU --zero_stage 2 keeps flex attention)"
        )
    return None


def fit_loss_to_machine(args, on_gpu: bool, zero_stage: int | None) -> str | None:
    """loss_implementation: liger runs Triton kernels on a GPU and reads the heads' whole weights: off a GPU, or under
    ZeRO-3 (which partitions them), the same KL runs through the chunked loss. Returns the line that says so."""
    if getattr(args, "loss_implementation", None) != "liger":
        return None
    why = "training on the CPU" if not on_gpu else "ZeRO-3 partitions the heads' weights" if zero_stage == 3 else None
    if why:
        args.loss_implementation = "chunked"
        return f"loss_implementation liger -> chunked ({why}; the same KL, liger is the faster one on a GPU)"
    return None


def check_teacher_fp8(args, on_gpu: bool, zero_stage: int | None) -> None:
    """teacher_fp8: true before any model loads: not under ZeRO-3 (it partitions the weights FP8 replaces), and on a
    GPU only one with FP8 matrix units (compute capability >= 8.9)."""
    if not getattr(args, "teacher_fp8", False):
        return
    if zero_stage == 3:
        raise RecipeError(
            "teacher_fp8: true replaces the teacher's linear weights, which ZeRO-3 partitions: add "
            "--zero_stage 2 (one GPU, or a teacher that fits each GPU) or set teacher_fp8: false"
        )
    import torch

    if on_gpu and torch.cuda.get_device_capability() < (8, 9):
        raise RecipeError(
            f"teacher_fp8: true needs FP8 matrix units (compute capability >= 8.9); "
            f"{torch.cuda.get_device_name()} has none: set teacher_fp8: false"
        )
