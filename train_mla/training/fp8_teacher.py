"""An FP8 forward for the frozen teacher: its decoder's linear layers as float8 (e4m3) matrix products.

Each weight is quantised once, per output row (scale = row amax / 448, the e4m3 maximum); each input per token, at
every call. `torch._scaled_mm` multiplies the two in FP8 with these row-wise scales and writes bf16 (on Hopper the FP8
tensor cores run at twice the bf16 rate). The embedding, the norms, attention itself and the LM head stay bf16: the
head sets the targets' logits directly, and the per-token distribution is what the KL term learns from.

Only for a frozen model (no gradients flow through `Float8Linear`) and not under DeepSpeed ZeRO-3, which partitions
the parameters this replaces. `benchmarks/fp8_teacher_kl.py` measures how much the targets change.
"""

import torch
from torch import nn

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x / scale in e4m3 [M, K], scale [M, 1] float32) with scale = row amax / 448."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Float8Linear(nn.Module):
    """y = x W^T (+ b) with W stored in e4m3 and one float32 scale per output row; x quantised per row at each call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"FP8 matrix products need widths divisible by 16, not {linear.weight.shape}")
        weight, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", weight)  # [N, K] e4m3
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # [1, N] float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_fp8, x_scale = quantize_rows(x.reshape(-1, self.in_features))  # [M, K], [M, 1]
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 or x.is_cuda else torch.float32
        y = torch._scaled_mm(
            x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=out_dtype
        )  # [M, N]; W^T is column-major, as the kernel wants
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def quantize_teacher_fp8(model: nn.Module) -> int:
    """Replace every nn.Linear inside the decoder layers (model.model.layers) by a Float8Linear; returns how many.
    The model must be frozen."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("quantize_teacher_fp8 is for a frozen teacher: its parameters require gradients")
    n = 0
    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            if type(child) is nn.Linear:
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], Float8Linear(child))
                n += 1
    return n
