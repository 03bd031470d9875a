"""Colinearity Decay's penalty as pure functions of one ordered pair of weights (docs/colinearity.md).

For a pair whose first weight is A (d_mid, d_in) and second is B (d_out, d_mid), the pair's map is
B·A. Its *alignment*

    R(A, B) = ‖BA‖²_F / (‖A‖²_F · ‖B‖²_F) = Σ_ij σ_i(B)² σ_j(A)² (v_i(B)·u_j(A))² / (Σ_i σ_i(B)² · Σ_j σ_j(A)²)

is the σ²-weighted mean squared cosine between B's input directions and A's output directions: 1
when one rank-1 direction passes straight through both, 1/d_mid on average for directions that are
oriented at random to each other. R is invariant to scaling A or B, so its gradient is orthogonal to
each weight (⟨∂R/∂A, A⟩ = 0).

Depends on torch only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from s2d.colinearity.config import Pair

__all__ = ["alignment", "alignment_gradients", "alignment_ratio", "top_alignment", "effective_first",
           "fold_first", "first_block", "hold_top_singular_", "pair_steps"]


def first_block(w_first: Tensor, pair: Pair) -> Tensor:
    """The rows of the first weight that feed the second (a view): (rows, d_in)."""
    return w_first if pair.rows is None else w_first[pair.rows[0]:pair.rows[1]]


def effective_first(block: Tensor, pair: Pair) -> Tensor:
    """A as the second weight sees it: grouped-query kv heads repeated for their query heads.

    block (kv·head_dim, d_in) -> (kv·kv_repeat·head_dim, d_in), head h reading kv head h // kv_repeat
    (transformers' ``repeat_kv``). Without grouped-query attention the block itself.
    """
    if pair.kv_repeat == 1:
        return block
    kv, hd = block.shape[0] // pair.head_dim, pair.head_dim
    grouped = block.reshape(kv, 1, hd, block.shape[1]).expand(kv, pair.kv_repeat, hd, block.shape[1])
    return grouped.reshape(kv * pair.kv_repeat * hd, block.shape[1])


def fold_first(grad: Tensor, pair: Pair) -> Tensor:
    """The adjoint of :func:`effective_first`: a gradient w.r.t. the effective A summed back onto the block,
    (kv·kv_repeat·head_dim, d_in) -> (kv·head_dim, d_in)."""
    if pair.kv_repeat == 1:
        return grad
    hd = pair.head_dim
    kv = grad.shape[0] // (hd * pair.kv_repeat)
    return grad.reshape(kv, pair.kv_repeat, hd, grad.shape[1]).sum(1).reshape(kv * hd, grad.shape[1])


def alignment(a: Tensor, b: Tensor) -> Tensor:
    """R(A, B) in [0, 1] (a 0-d tensor): a (d_mid, d_in), b (d_out, d_mid)."""
    return (b @ a).square().sum() / (a.square().sum() * b.square().sum())


def alignment_gradients(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """R and its closed-form gradients (∂R/∂A (d_mid, d_in), ∂R/∂B (d_out, d_mid)).

    With P = BA, N_A = ‖A‖²_F, N_B = ‖B‖²_F:  ∂R/∂A = 2 BᵀP / (N_A N_B) − 2R A / N_A  and
    ∂R/∂B = 2 P Aᵀ / (N_A N_B) − 2R B / N_B. Three matmuls of d_out·d_mid·d_in multiply-adds.
    """
    na, nb = a.square().sum(), b.square().sum()
    p = b @ a
    r = p.square().sum() / (na * nb)
    ga = (b.T @ p).mul_(2 / (na * nb)).sub_(a, alpha=float(2 * r / na))
    gb = (p @ a.T).mul_(2 / (na * nb)).sub_(b, alpha=float(2 * r / nb))
    return r, ga, gb


def alignment_ratio(r: float, d_mid: int) -> float:
    """R relative to the alignment of randomly oriented weights (1/d_mid): 1 = chance, d_mid = rank-1 aligned."""
    return float(r) * d_mid


def top_alignment(a: Tensor, b: Tensor) -> float:
    """‖BA‖₂ / (‖A‖₂ ‖B‖₂) in [0, 1]: how much of the top gains survive the pair (1: top directions aligned)."""
    a, b = a.detach().double(), b.detach().double()
    spec = lambda m: torch.linalg.matrix_norm(m, ord=2)  # noqa: E731
    return float(spec(b @ a) / (spec(a) * spec(b)))


def hold_top_singular_(step: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Remove from ``step`` (m, n) the part that changes the singular values of u, v (m, k), (n, k).

    To first order a change dW moves σ_j by u_jᵀ dW v_j; subtracting Σ_j (u_jᵀ dW v_j) u_j v_jᵀ leaves
    those k values unchanged (the directions may still turn). In place; returns ``step``.
    """
    d = torch.einsum("ik,ij,jk->k", u, step, v)
    return step.sub_((u * d) @ v.T)


def pair_steps(w_first: Tensor, w_second: Tensor, pair: Pair) -> tuple[Tensor, Tensor, Tensor]:
    """R and the decoupled steps ‖W‖²_F · ∂R/∂W of the first weight's block and the second weight.

    Both steps have the units of their weight (R is scale-invariant, so ∂R/∂W scales as 1/‖W‖), which
    makes ``CDConfig.strength`` dimensionless. Computed in float32 (float64 for float64 weights).
    Returns (R, step for :func:`first_block` (rows, d_in), step for the second weight (d_out, d_mid)).
    """
    dtype = torch.float64 if w_first.dtype == torch.float64 else torch.float32
    block = first_block(w_first.detach(), pair).to(dtype)
    b = w_second.detach().to(dtype)
    a = effective_first(block, pair)
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"Pair {pair.first} -> {pair.second}: the second weight reads {b.shape[1]} inputs, "
                         f"the first gives {a.shape[0]} (check Pair.rows / head_dim / kv_repeat)")
    r, ga, gb = alignment_gradients(a, b)
    return r, fold_first(ga, pair).mul_(block.square().sum()), gb.mul_(b.square().sum())
