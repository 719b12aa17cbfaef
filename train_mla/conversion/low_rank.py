"""Truncated SVD factorisation W ~= up @ down, with fixed or energy-based rank.

The singular values go into the down-projection (X-EcoMLA's convention), so the up-projections start with
orthonormal columns. When the requested rank exceeds the matrix's rank, the extra latent directions get zero
rows in `down` and orthonormal columns in `up`, so both factors still receive gradients during training.
"""

import math

import torch


def energy_rank(singular_values: torch.Tensor, energy_ratio: float) -> int:
    """Smallest k whose top-k singular values hold at least `energy_ratio` of sum(S^2)."""
    if not 0.0 < energy_ratio <= 1.0:
        raise ValueError(f"energy ratio must be in (0, 1], got {energy_ratio}")
    energy = singular_values.double().pow(2).cumsum(0)
    kept = energy / energy[-1]
    return int(torch.searchsorted(kept, torch.tensor(energy_ratio, dtype=kept.dtype) - 1e-12).item()) + 1


def round_up(rank: int, multiple: int, cap: int) -> int:
    return min(cap, multiple * math.ceil(rank / multiple)) if multiple > 1 else min(rank, cap)


def factorize(
    weight: torch.Tensor, rank: int, *, dtype=torch.float64, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (up [out, rank], down [rank, in]) with up @ down the best rank-`rank` approximation of weight."""
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(weight.shape)}] for a {tuple(weight.shape)} matrix")
    W = weight.detach().to(device=device or weight.device, dtype=dtype)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # [out, k], [k], [k, in]
    return U[:, :rank].cpu(), (S[:rank, None] * Vh[:rank]).cpu()


def singular_values(weight: torch.Tensor, *, dtype=torch.float64, device=None) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().to(device=device or weight.device, dtype=dtype)).cpu()


def orthonormal_completion(basis: torch.Tensor, extra: int, seed: int = 0) -> torch.Tensor:
    """`extra` orthonormal columns orthogonal to the orthonormal columns of `basis` [n, k] (deterministic)."""
    n, k = basis.shape
    if k + extra > n:
        raise ValueError(f"cannot add {extra} orthonormal columns to {k} in dimension {n}")
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(n, extra, generator=g, dtype=basis.dtype).to(basis.device)
    R = R - basis @ (basis.T @ R)
    R = R - basis @ (basis.T @ R)  # twice is enough in float64
    Q, _ = torch.linalg.qr(R)
    return Q
