"""ERQ's two error-reduction steps for one Linear, on cached tensors (pure torch, float64 inside).

- :func:`aqer`: activation-error reduction, ridge regression of the layer's output error caused by its
  quantized input onto the weights and bias.
- :func:`wqer`: weight-error reduction, repeated "quantize half of the remaining columns, refine their
  rounding, compensate the still-float columns by ridge regression".

Shapes: W (m, n) weight, b (m,) bias, X (N, n) inputs (N tokens), Y (N, m) outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ridge_solve", "ridge_solve_gram", "aqer", "RowGrid", "refine_rounding", "wqer"]


def ridge_solve(a: Tensor, rhs: Tensor, lam: float) -> Tensor:
    """(AᵀA + λI)⁻¹ Aᵀ rhs for A (N, n), rhs (N, m) -> (n, m), float64, via Cholesky (lstsq fallback)."""
    a64, r64 = a.double(), rhs.double()
    return ridge_solve_gram(a64.T @ a64, a64.T @ r64, lam)


def ridge_solve_gram(gram: Tensor, rhs: Tensor, lam: float) -> Tensor:
    """(G + λI)⁻¹ rhs for a Gram matrix G (n, n) and rhs (n, m), float64."""
    g = gram.double() + lam * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.double(), chol)
    return torch.linalg.lstsq(g, rhs.double()).solution


def aqer(weight: Tensor, bias: Tensor | None, x_q: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Aqer: δ = (X̃ᵀX̃ + λI)⁻¹ X̃ᵀ (Y − X̃ [W b]ᵀ) with X̃ = [x_q, 1]; returns ([W b] + δᵀ) split as (W, b).

    x_q: (N, n) quantized inputs; y: (N, m) float outputs W x + b on the unquantized inputs.
    A missing bias is treated as zero and a bias is returned anyway.
    """
    m, n = weight.shape
    b = torch.zeros(m, dtype=weight.dtype, device=weight.device) if bias is None else bias
    xa = torch.cat([x_q.double(), torch.ones(x_q.shape[0], 1, dtype=torch.float64, device=x_q.device)], 1)
    wb = torch.cat([weight.double(), b.double()[:, None]], 1)
    resid = y.double() - xa @ wb.T
    delta = ridge_solve(xa, resid, lam)  # (n + 1, m)
    wb = wb + delta.T
    return wb[:, :n].to(weight.dtype), wb[:, n].to(weight.dtype)


@dataclass(frozen=True)
class RowGrid:
    """Uniform weight grid: value = (code − zero) · scale, code ∈ [qmin, qmax].

    scale, zero: (m,), one grid per output row, or (m, n), one per entry (ERQ's two-part quantizer,
    whose outlier columns have a grid of their own).
    """

    scale: Tensor  # (m,) or (m, n) step
    zero: Tensor   # (m,) or (m, n) zero point (in codes)
    qmin: int      # lowest code
    qmax: int      # highest code

    def _bc(self, t: Tensor) -> Tensor:
        """``t`` in float64, broadcastable against (m, k) weights."""
        return t.double()[:, None] if t.dim() == 1 else t.double()

    def step(self) -> Tensor:
        """The step, (m, 1) or (m, n), float64."""
        return self._bc(self.scale)

    def columns(self, idx: Tensor) -> RowGrid:
        """The grid of columns ``idx`` (the same grid when it is per row)."""
        if self.scale.dim() == 1:
            return self
        return RowGrid(self.scale[:, idx], self.zero[:, idx], self.qmin, self.qmax)

    def rows(self, sl: slice) -> RowGrid:
        """The grid of rows ``sl``."""
        return RowGrid(self.scale[sl], self.zero[sl], self.qmin, self.qmax)

    def codes(self, w: Tensor) -> Tensor:
        """Continuous codes w/Δ + z, (m, k) for w (m, k) (k = n for a per-entry grid)."""
        return w.double() / self.step() + self._bc(self.zero)

    def dequant(self, q: Tensor) -> Tensor:
        """Values (q − z) · Δ, float64, for codes q (m, k)."""
        return (q - self._bc(self.zero)) * self.step()


def refine_rounding(
    w: Tensor, grid: RowGrid, hess: Tensor, max_flips: int = 100, row_group: int = 500
) -> Tensor:
    """ERQ rounding refinement: greedy floor/ceil flips per row that lower δ H δᵀ, δ = Q(w) − w.

    w: (m, k) weight columns being quantized, ``grid`` theirs (:meth:`RowGrid.columns`); hess: (k, k) = μμᵀ + Σ = E[x̃ x̃ᵀ] over those columns.
    Starts from round-to-nearest; per row, at most ``max_flips`` flips, each the one with the largest
    decrease of the proxy, stopping when none decreases it. Returns the dequantized weights (m, k).
    """
    hess = hess.double()
    diag = torch.diagonal(hess)
    out = []
    for start in range(0, w.shape[0], row_group):
        sl = slice(start, start + row_group)
        sub = grid.rows(sl)
        v = sub.codes(w[sl])
        q = v.round().clamp(grid.qmin, grid.qmax)
        alt = torch.where(v > q, q + 1, q - 1)
        ok = (alt >= grid.qmin) & (alt <= grid.qmax) & (v >= grid.qmin) & (v <= grid.qmax)
        delta = sub.dequant(q) - w[sl].double()
        hd = delta @ hess  # (rows, k)
        step = sub.step()
        for _ in range(max_flips):
            c = (alt - q) * step  # change of δ if flipped
            gain = 2 * c * hd + c * c * diag[None, :]  # change of δHδᵀ
            gain = torch.where(ok, gain, torch.full_like(gain, float("inf")))
            best, j = gain.min(dim=1)
            rows = torch.nonzero(best < -1e-12 * (1 + (delta * hd).sum(1).abs()), as_tuple=True)[0]
            if rows.numel() == 0:
                break
            jj = j[rows]
            cj = c[rows, jj]
            hd[rows] += cj[:, None] * hess[jj]
            delta[rows, jj] += cj
            old = q[rows, jj].clone()
            q[rows, jj] = alt[rows, jj]
            alt[rows, jj] = old
        out.append(sub.dequant(q))
    return torch.cat(out).to(w.dtype)


def wqer(
    weight: Tensor,
    x_q: Tensor,
    grid: RowGrid,
    lam: float,
    max_flips: int = 100,
    row_group: int = 500,
    refine: bool = True,
    bias: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Wqer: quantize columns half by half with rounding refinement and ridge compensation.

    weight: (m, n) (after Aqer); x_q: (N, n) quantized layer inputs; grid: the calibrated weight grid.
    Each round takes the first half of the still-float columns (index order), rounds them (refined when
    ``refine``), and adds δ2 = −(X̃₂ᵀX̃₂ + λI)⁻¹ X̃₂ᵀ X̃₁ δ1ᵀ to the remaining float columns.
    With ``bias`` (m,) the bias is one more float column (input 1) that is never quantized and always
    among the compensated ones, as in the official code: each round then quantizes ⌊(k + 1)/2⌋ of the k
    remaining weight columns. Returns the final weight, every entry on ``grid`` (m, n), and with a bias
    the pair (weight, compensated bias (m,)).
    """
    n = weight.shape[1]
    w = weight.double().clone()
    x64 = x_q.double()
    if bias is not None:
        w = torch.cat([w, bias.detach().double()[:, None]], 1)
        x64 = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64, device=x64.device)], 1)
    gram = x64.T @ x64  # (n[+1], n[+1]) = N · E[x̃ x̃ᵀ]
    n_tok = x64.shape[0]
    extra = torch.arange(n, w.shape[1], device=w.device)  # the bias column, if any
    remaining = torch.arange(n, device=w.device)
    while remaining.numel() > 0:
        k = (remaining.numel() + 1) // 2  # ceil(r/2) of r columns; with the bias floor((r+1)/2), the same number
        s1, s2 = remaining[:k], torch.cat([remaining[k:], extra])
        w1 = w[:, s1]
        if refine:
            q1 = refine_rounding(w1, grid.columns(s1), gram[s1][:, s1] / n_tok, max_flips, row_group).double()
        else:
            g1 = grid.columns(s1)
            q1 = g1.dequant(g1.codes(w1).round().clamp(grid.qmin, grid.qmax))
        delta1 = q1 - w1
        w[:, s1] = q1
        if s2.numel() > 0:
            comp = -ridge_solve_gram(gram[s2][:, s2], gram[s2][:, s1] @ delta1.T, lam)  # (|s2|, m)
            w[:, s2] += comp.T
        remaining = remaining[k:]
    if bias is None:
        return w.to(weight.dtype)
    return w[:, :n].to(weight.dtype), w[:, n].to(bias.dtype)
