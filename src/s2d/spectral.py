"""Spectral core: singular value decomposition of weights via a Gram matrix, PCDR, rank selection.

The spectrum of an m x n weight W is computed from the Gram matrix of its smaller side
(``W Wᵀ`` when m <= n, else ``Wᵀ W``) with ``torch.linalg.eigh``; the eigenvectors give one side's
singular vectors, and the other side is ``W v_r`` (or ``Wᵀ u_r``) normalised to unit length, and σ_r is the norm of that
product (no square root of a possibly negative tiny eigenvalue, no division by ~0).  Directions whose
singular value is numerically zero (rank-deficient weights) get an orthonormal completion.  Weights of
the same shape are stacked and decomposed in one batched call.

Precision: the default compute dtype is float32 (float64 for float64 weights).  The leading singular
values/vectors and PCDR curves then agree with ``torch.linalg.svd`` to float32 rounding (~1e-6
relative), which is all S2D uses; the small end of the spectrum is resolved only to ~sqrt(eps)·σ_max
(~1e-4·σ_max) because forming the Gram matrix squares the condition number.  Pass
``compute_dtype=torch.float64`` for a tail accurate to float64 rounding (about 1.5-2x slower on CPU).

Depends on torch only.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Spectrum", "spectrum", "spectra", "intra_op_threads", "top_k", "pcdr_curve", "pcdr_terms", "select_rank"]


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD ``W ≈ U @ diag(S) @ V.T`` of an (m, n) weight, r = min(m, n).

    U: (m, r) left singular vectors; S: (r,) singular values, descending, >= 0; V: (n, r) right
    singular vectors.  Tensors live on the weight's device, in the compute dtype (float32, or float64
    for float64 weights / when asked).
    """

    U: Tensor
    S: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        """Number of components r = min(m, n)."""
        return int(self.S.shape[-1])


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"spectrum expects a 2-D weight, got shape {shape}")
    if weight.numel() == 0:
        raise ValueError(f"spectrum expects a non-empty weight, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"spectrum expects a finite weight (shape {tuple(weight.shape)} has NaN/Inf)")


def _compute_dtype(weight: Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _complete_columns(Q: Tensor, good: Tensor) -> Tensor:
    """Replace the columns of one (d, r) matrix not flagged ``good`` by an orthonormal completion."""
    d, r = Q.shape
    keep = Q[:, good]
    basis = torch.cat([keep, torch.eye(d, dtype=Q.dtype, device=Q.device)], dim=1)
    complement = torch.linalg.qr(basis, mode="complete").Q[:, keep.shape[1]:]
    out = Q.clone()
    out[:, ~good] = complement[:, : int((~good).sum())]
    return out


def _batched_spectrum(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a (b, m, n) stack in its own dtype; returns U (b,m,r), S (b,r), V (b,n,r)."""
    b, m, n = W.shape
    wide = m <= n
    gram = W @ W.transpose(1, 2) if wide else W.transpose(1, 2) @ W
    _, Q = torch.linalg.eigh(gram)                      # ascending eigenvalues
    Q = Q.flip(-1)                                      # (b, r, r) eigvecs of the small side, descending
    P = W.transpose(1, 2) @ Q if wide else W @ Q        # (b, big, r) = σ_r · other-side vector
    S = torch.linalg.vector_norm(P, dim=1)              # (b, r)
    order = torch.argsort(S, dim=-1, descending=True)   # tail norms may be slightly out of order
    S = torch.gather(S, 1, order)
    Q = torch.gather(Q, 2, order.unsqueeze(1).expand_as(Q))
    P = torch.gather(P, 2, order.unsqueeze(1).expand_as(P))
    tol = S[:, :1] * max(m, n) * torch.finfo(W.dtype).eps
    good = S > tol
    P = P / torch.where(good, S, torch.ones_like(S)).unsqueeze(1)
    if not bool(good.all()):
        for i in range(b):
            if not bool(good[i].all()):
                P[i] = _complete_columns(P[i], good[i])
                S[i] = torch.where(good[i], S[i], torch.zeros_like(S[i]))
    return (Q, S, P) if wide else (P, S, Q)


def spectra(weights: Sequence[Tensor], compute_dtype: torch.dtype | None = None,
            threads: int | None = 1) -> list[Spectrum]:
    """Thin SVDs of several 2-D weights; weights of equal shape, dtype and device are batched.

    Args:
        weights: 2-D tensors (m_i, n_i), finite.
        compute_dtype: dtype of the Gram matrix and eigensolver; default float32 (float64 for float64
            weights).  float32 matches ``torch.linalg.svd`` in float32 on the leading components and PCDR;
            pass ``torch.float64`` for a tail accurate to float64 rounding.
        threads: CPU threads of the pass. 1 (the default): on a dedicated worker thread that never has
            an OpenMP team; k > 1: on the calling thread with a team of k (restored after); None: on
            the calling thread as it is. The default is deliberate: a multi-threaded ``eigh`` meets its
            team at barriers, and when another job (or another thread's team) shares the cores a
            descheduled team member stalls every barrier. One thread is ~1.5x slower on an idle 2-core
            machine and ~1.1x slower on a loaded one, where a team of 2 is 2.5-9x slower
            (``benchmarks/bench_contention.py``, docs/benchmarks.md). CUDA weights ignore it.
    Returns:
        one :class:`Spectrum` per weight, in input order.
    Raises:
        ValueError: a weight is not 2-D, empty, or holds NaN/Inf.
    """
    for w in weights:
        _check_weight(w)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        groups[(tuple(w.shape), w.dtype, w.device)].append(i)
    out: list[Spectrum | None] = [None] * len(weights)

    def run() -> None:
        with torch.no_grad():
            for idx in groups.values():
                dtype = _compute_dtype(weights[idx[0]], compute_dtype)
                stack = torch.stack([weights[i].detach().to(dtype) for i in idx])
                U, S, V = _batched_spectrum(stack)
                for j, i in enumerate(idx):
                    out[i] = Spectrum(U=U[j], S=S[j], V=V[j])

    if threads is None or not all(w.device.type == "cpu" for w in weights):
        run()
    elif threads == 1:
        _single_thread().submit(run).result()   # re-raises the pass's exception here
    else:
        with intra_op_threads(threads):
            run()
    return out  # type: ignore[return-value]


# One long-lived worker thread that never has an OpenMP team: setting 1 thread on the caller's own
# thread and back (``intra_op_threads(1)``) leaves its team's threads to spin against the pass, which
# measured as slow as a full team on a loaded machine. Recreated after a fork (the thread is not copied).
_POOL: list[ThreadPoolExecutor] = []


def _single_thread() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="s2d-spectral", initializer=torch.set_num_threads,
                                        initargs=(1,)))
    return _POOL[0]


os.register_at_fork(after_in_child=_POOL.clear)


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` on this thread, then restore (None: no change)."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spectrum(weight: Tensor, compute_dtype: torch.dtype | None = None, threads: int | None = 1) -> Spectrum:
    """Thin SVD of one 2-D weight (m, n): U (m, r), S (r,) descending, V (n, r); see :func:`spectra`."""
    return spectra([weight], compute_dtype=compute_dtype, threads=threads)[0]


def top_k(s: Spectrum, k: int) -> Spectrum:
    """The first ``k`` components (clipped to the rank): U (m, k), S (k,), V (n, k)."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    k = min(k, s.rank)
    return Spectrum(U=s.U[:, :k], S=s.S[:k], V=s.V[:, :k])


def pcdr_terms(spectrum: Spectrum, x: Tensor, neuron: int) -> Tensor:
    """Per-component contributions σ_r u_{ir} v_rᵀ x of activation A_i = (W x)_i (paper eq. 1), float64 (r,)."""
    U, S, V = spectrum.U, spectrum.S, spectrum.V
    x = x.detach().reshape(-1).to(device=V.device, dtype=torch.float64)
    if x.shape[0] != V.shape[0]:
        raise ValueError(f"pcdr: x has {x.shape[0]} features, weight expects {V.shape[0]}")
    if not 0 <= neuron < U.shape[0]:
        raise ValueError(f"pcdr: neuron must be in [0, {U.shape[0]}), got {neuron}")
    return S.double() * U[neuron].double() * (V.double().T @ x)


def pcdr_curve(weight: Tensor, x: Tensor, neuron: int, spectrum: Spectrum | None = None) -> Tensor:
    """PCDR curve of one activation (paper eq. 2).

    Args:
        weight: (m, n) weight W; the activation is A_i = (W x)_i, bias excluded.
        x: (n,) input row x_j.
        neuron: output index i in [0, m).
        spectrum: precomputed :func:`spectrum` of ``weight`` to reuse (optional).
    Returns:
        float64 tensor c of shape (r,), r = min(m, n): c[k-1] = PCDR_k = Σ_{r<=k}|t_r| / Σ_r |t_r| with
        t_r = σ_r u_{ir} v_rᵀ x.  Non-decreasing, c[-1] = 1.  All zeros when every t_r is 0 (A_i = 0 has
        no dominant component).
    """
    if spectrum is None:
        spectrum = spectra([weight])[0]
    t = pcdr_terms(spectrum, x, neuron).abs()
    total = t.sum()
    if not bool(total > 0):
        return torch.zeros_like(t)
    return (t.cumsum(0) / total).clamp_(max=1.0)


def select_rank(curve: Tensor, tau: float, k_max: int) -> int | None:
    """Smallest k in [1, k_max] with ``curve[k-1] >= tau`` (the paper's k_target), or None if none."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"select_rank: tau must be in (0, 1], got {tau}")
    if k_max < 1:
        raise ValueError(f"select_rank: k_max must be >= 1, got {k_max}")
    head = curve[: min(k_max, curve.shape[0])]
    hits = torch.nonzero(head >= tau)
    return int(hits[0, 0]) + 1 if hits.numel() else None
