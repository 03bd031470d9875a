"""Rank-r approximations of one Linear y = W x + b, in weight space and in feature space, as pure
functions of (W, b) and its input moments (docs/lowrank.md). Torch only.

* **Weight space** (SVD truncation): W_r = U_r diag(σ_r) V_rᵀ, the bias kept.
* **Feature space** (LLM-ROM): the PCA of the layer's *outputs* on calibration data. With μ_y = Wμ + b
  and the output covariance C_y = W C_x Wᵀ = P diag(λ) Pᵀ, the layer becomes
  ŷ = P_r P_rᵀ (y − μ_y) + μ_y = P_r (P_rᵀ W) x + (μ_y − P_r P_rᵀ W μ).

Every curve below is a closed form over all ranks at once, from one SVD (weight space) or one
eigendecomposition (feature space) and the inputs' E[x], E[x xᵀ]; tests check them against building
each truncation and scoring it on the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RankCurves", "rank_curves", "smallest_rank", "weight_factors", "feature_factors", "factor_params"]


@dataclass
class RankCurves:
    """Relative errors of the rank-r approximations of one Linear, r = 1..R (entry r − 1), R = min(d_out, d_in)."""
    weight_frob: Tensor        # (R,) weight space: ‖W − W_r‖_F / ‖W‖_F
    weight_output: Tensor      # (R,) weight space: ‖(W − W_r) X‖_F / ‖W X + b‖_F on the calibration inputs
    feature_frob: Tensor       # (R,) feature space: ‖W − P_r P_rᵀ W‖_F / ‖W‖_F
    feature_output: Tensor     # (R,) feature space: ‖Ŷ_r − Y‖_F / ‖Y‖_F on the calibration inputs


def _output_energy(w: Tensor, b: Tensor | None, mean: Tensor, second: Tensor) -> Tensor:
    """E‖W x + b‖² from E[x] and E[x xᵀ] (float64 scalar)."""
    energy = torch.einsum("ij,jk,ik->", w, second, w)
    if b is not None:
        energy = energy + 2 * b @ (w @ mean) + b @ b
    return energy


def _tail(values: Tensor) -> Tensor:
    """t[r-1] = Σ_{i>r} values[i-1] for r = 1..len (suffix sums, last entry 0)."""
    return (values.flip(0).cumsum(0).flip(0) - values).clamp_min(0)


def rank_curves(weight: Tensor, bias: Tensor | None, mean: Tensor, second: Tensor) -> RankCurves:
    """All four error curves of a Linear (weight (d_out, d_in), bias (d_out,) or None) whose inputs have
    E[x] = ``mean`` (d_in,) and E[x xᵀ] = ``second`` (d_in, d_in). Computed in float64."""
    w, b = weight.detach().double(), bias.detach().double() if bias is not None else None
    mean, second = mean.double(), second.double()
    rank = min(w.shape)
    wf2 = w.square().sum()
    energy = _output_energy(w, b, mean, second).clamp_min(torch.finfo(torch.float64).tiny)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    weight_frob = (_tail(s.square()) / wf2).sqrt()
    gains = torch.einsum("ri,ij,rj->r", vh, second, vh)            # v_iᵀ E[x xᵀ] v_i
    weight_output = (_tail(s.square() * gains) / energy).sqrt()
    lam, p = _output_pca(w, mean, second)
    feature_output = (_tail(lam) / energy).sqrt()[:rank]
    kept = (p.T @ w).square().sum(1)                                 # ‖p_iᵀ W‖², descending λ order
    feature_frob = ((wf2 - kept.cumsum(0)).clamp_min(0) / wf2).sqrt()[:rank]
    return RankCurves(weight_frob, weight_output, feature_frob, feature_output)


def _output_pca(w: Tensor, mean: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (d_out,), descending, and eigenvectors (d_out, d_out) of C_y = W C_x Wᵀ."""
    cov_x = second - torch.outer(mean, mean)
    lam, p = torch.linalg.eigh(w @ cov_x @ w.T)
    return lam.flip(0).clamp_min(0), p.flip(1)


def smallest_rank(curve: Tensor, threshold: float) -> int:
    """The smallest r whose error ``curve[r-1]`` is <= ``threshold`` (len(curve): full rank, when none is)."""
    ok = (curve <= threshold).nonzero()
    return int(ok[0]) + 1 if ok.numel() else int(curve.numel())


def weight_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """W_r = second @ first with first = diag(√σ_r) V_rᵀ (r, d_in) and second = U_r diag(√σ_r) (d_out, r)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


def feature_factors(weight: Tensor, bias: Tensor | None, mean: Tensor, second: Tensor,
                    r: int) -> tuple[Tensor, Tensor, Tensor]:
    """The feature-space rank-r layer as (first (r, d_in), second (d_out, r), second's bias (d_out,)):
    ŷ = second @ (first @ x) + bias = P_r P_rᵀ (W x + b − μ_y) + μ_y."""
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    _, p = _output_pca(w, mean.double(), second.double())
    pr = p[:, :r]
    first = pr.T @ w
    mu_y = w @ mean.double() + b
    return first, pr, mu_y - pr @ (first @ mean.double())


def factor_params(d_out: int, d_in: int, r: int, bias: bool = True) -> int:
    """Parameters of the two factors at rank r (r·(d_in + d_out), plus the bias)."""
    return r * (d_in + d_out) + (d_out if bias else 0)
