"""PTQ4ViT's searches for one layer on recorded tensors: the weight / input steps of a Linear (or of a
patch-embedding convolution as its equivalent Linear) under the Hessian-guided output distance, and the
step (or softmax threshold) of an attention-matmul input quantizer. The candidate factors come from
:meth:`s2d.quant.ptq.ptq4vit.PTQ4ViTConfig.factors`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from s2d.quant.nonuniform import TwinUniformQuantizer
from s2d.quant.ptq.ptq4vit_math import chunk_size, search_scale, sym_fq, twin_gelu_fq, twin_softmax_fq
from s2d.quant.quantizers import Quantizer, UniformQuantizer

__all__ = ["set_sym", "get_param", "set_param", "act_fq", "search_layer", "search_attn_quantizer", "search_matmul"]


def set_sym(q: UniformQuantizer, scale: Tensor) -> None:
    """Symmetric uniform quantizer with step ``scale`` (scalar or one per row)."""
    s = scale.reshape(-1).float()
    q.set_range(-s * q.qmax, s * q.qmax)


def get_param(q: Quantizer) -> Tensor:
    """The searched parameter of a quantizer: the softmax threshold / positive GELU step of a twin quantizer
    (1,), else the step(s)."""
    if isinstance(q, TwinUniformQuantizer):
        return (q.threshold if q.mode == "softmax" else q.pos_step).reshape(1).clone()
    return q.scale.reshape(-1).clone()


def set_param(q: Quantizer, p: Tensor) -> None:
    """Set what :func:`get_param` reads."""
    if isinstance(q, TwinUniformQuantizer):
        if q.mode == "softmax":
            q.threshold = p.reshape(()).clone()
        else:
            q.pos_step = p.reshape(()).clone()
    else:
        set_sym(q, p)


def act_fq(q: Quantizer, x: Tensor, p: Tensor) -> Tensor:
    """Input quantizer ``q`` applied to x (N, n) with candidate parameters p (K,) -> (K, N, n)."""
    p = p.reshape(-1, 1, 1).to(x)
    if isinstance(q, TwinUniformQuantizer):
        return twin_gelu_fq(x[None], q.neg_step.to(x), p, q.levels)
    return sym_fq(x[None], p, q.qmax, q.qmin)


@torch.no_grad()
def search_layer(w: Tensor, bias: Tensor | None, wq: UniformQuantizer, aq: Quantizer | None, n_groups: int,
                 x: Tensor, g: Tensor | None, factors: Sequence[float], rounds: int) -> dict:
    """Alternating weight / input step search for a layer O = Q_a(X) Q_w(W)ᵀ + b: weight w (m, n), bias (m,)
    or None, quantizers wq and aq (``aq`` None: a float input, the weight search only), float inputs x
    (N, n), gradients g (N, m) (None: plain MSE). Weight steps: one per group of m / n_groups output rows.
    ``rounds`` alternating rounds over the candidates Δ_init·f, f in ``factors``, each minimising
    mean[(g ⊙ (O_fp − O_q))²]. Returns the distance before (initial steps) and after."""
    b = 0 if bias is None else bias
    o_fp = x @ w.T + b
    m, per = w.shape[0], w.shape[0] // n_groups
    wg = w.reshape(n_groups, per, -1)
    chunk = chunk_size(x.shape[0] * max(w.shape))

    def dist(o_q: Tensor) -> Tensor:  # (K, N, m) -> (K, m)
        d = o_fp[None] - o_q
        d = d if g is None else d * g[None]
        return d.pow(2).mean(1)

    def w_obj(cands: Tensor) -> Tensor:  # (K, G) -> (K, G)
        qw = sym_fq(wg[None], cands[:, :, None, None], wq.qmax, wq.qmin).reshape(cands.shape[0], m, -1)
        return dist(xq @ qw.transpose(1, 2) + b).reshape(-1, n_groups, per).mean(2)

    def a_obj(cands: Tensor) -> Tensor:  # (K, 1) -> (K, 1)
        return dist(act_fq(aq, x, cands) @ qw_best.T + b).mean(1, keepdim=True)

    w_cur = get_param(wq)[::per].clone()
    a_cur = None if aq is None else get_param(aq).clone()
    w_init, a_init = w_cur.clone(), None if a_cur is None else a_cur.clone()
    first = last = None
    for _ in range(rounds if aq is not None else 1):
        xq = x if aq is None else act_fq(aq, x, a_cur)[0]
        w_cur, w_val = search_scale(w_obj, w_init, w_cur, factors, chunk)
        qw_best = sym_fq(wg, w_cur[:, None, None], wq.qmax, wq.qmin).reshape(m, -1)
        if first is None:
            first = float(w_obj(w_init[None]).mean())
        if aq is None:
            last = float(w_val.mean())
            break
        a_cur, a_val = search_scale(a_obj, a_init, a_cur, factors, chunk)
        last = float(a_val.mean())
    set_sym(wq, w_cur.repeat_interleave(per) if n_groups > 1 else w_cur)
    if aq is not None:
        set_param(aq, a_cur)
    return {"initial": first, "final": last}


@torch.no_grad()
def search_attn_quantizer(q: Quantizer, x: Tensor, g: Tensor | None, factors: Sequence[float],
                          softmax_k_max: int) -> None:
    """Input-space Hessian-guided search for an attention quantizer; x, g: (B, H, T, D|T). A twin-uniform
    softmax quantizer searches its threshold over 2^-k, k = 0..softmax_k_max."""
    if isinstance(q, TwinUniformQuantizer):  # softmax threshold over powers of two
        xf = x.reshape(-1)
        gf = None if g is None else g.reshape(-1)

        def obj(c: Tensor) -> Tensor:  # (K, 1)
            d = xf[None] - twin_softmax_fq(xf[None], c.reshape(-1, 1), q.levels)
            d = d if gf is None else d * gf[None]
            return d.pow(2).mean(1, keepdim=True)

        cands = [2.0 ** -k for k in range(softmax_k_max + 1)]
        best, _ = search_scale(obj, torch.ones(1), get_param(q), cands, chunk_size(xf.numel()))
        set_param(q, best)
        return
    if not q.symmetric:  # uniform probs (twin_softmax=False): keep the min-max range
        return
    per_head = q.granularity == "channel"
    xh = x.transpose(0, 1).reshape(x.shape[1], -1) if per_head else x.reshape(1, -1)
    gh = None if g is None else (g.transpose(0, 1).reshape(g.shape[1], -1) if per_head else g.reshape(1, -1))

    def obj(c: Tensor) -> Tensor:  # (K, H) -> (K, H)
        d = xh[None] - sym_fq(xh[None], c[:, :, None], q.qmax, q.qmin)
        d = d if gh is None else d * gh[None]
        return d.pow(2).mean(2)

    init = get_param(q)
    best, _ = search_scale(obj, init, init, factors, chunk_size(xh.numel()))
    set_sym(q, best)


# ----------------------------------------------------------------------------- attention matmuls

def _cand_fq(q: Quantizer, x: Tensor, cands: Tensor) -> Tensor:
    """x (B, H, T, X) fake-quantized by ``q`` with each candidate parameter row of ``cands`` (K, P), P the
    quantizer's heads (per-head steps) or 1 -> (K, B, H, T, X)."""
    if isinstance(q, TwinUniformQuantizer):  # softmax mode: the threshold
        return twin_softmax_fq(x[None], cands.reshape(-1, 1, 1, 1, 1), q.levels)
    return sym_fq(x[None], cands[:, None, :, None, None], q.qmax, q.qmin)


def _searchable(q: Quantizer) -> bool:
    """Twin-uniform softmax quantizers and symmetric uniform ones are searched (a plain asymmetric uniform
    probs quantizer, ``twin_softmax=False``, keeps its min-max range)."""
    return isinstance(q, TwinUniformQuantizer) or (isinstance(q, UniformQuantizer) and q.symmetric)


def _head_mean(d2: Tensor, groups: int) -> Tensor:
    """Squared distances (K, B, H, T, X) -> (K, groups): the mean per group of consecutive heads."""
    per_head = d2.mean(dim=(1, 3, 4))
    return per_head.reshape(d2.shape[0], groups, -1).mean(2)


def search_matmul(qa: Quantizer, qb: Quantizer, a: Tensor, b: Tensor, g: Tensor | None,
                  product: Callable[[Tensor, Tensor], Tensor], factors: Sequence[float], rounds: int,
                  softmax_k_max: int) -> dict:
    """PTQ4ViT's search for the two inputs of an attention matmul O = product(Q_a(A), Q_b(B)), scored on
    its output as the official code: ``rounds`` alternating rounds, A's parameter then B's, each over its
    candidates (steps Δ_init·f, f in ``factors``, per head; a softmax threshold over 2^-k, k =
    0..softmax_k_max) minimising mean[(g ⊙ (O_fp − O_q))²] per head, O_fp = product(A, B) on the float
    inputs a, b (B, H|Hkv, T, ·); g (B, H, T, ·) = ∂KL/∂O (None: plain MSE). ``product`` maps candidate
    stacks (K, ...) to outputs (K, B, H, T, ·). Returns the distance before and after."""
    out_fp = product(a[None], b[None])[0]
    chunk = chunk_size(2 * max(out_fp.numel(), a.numel(), b.numel()))

    def current(q: Quantizer, x: Tensor) -> Tensor:  # (1, B, H, T, X) with the current parameter
        return _cand_fq(q, x, get_param(q)[None]) if _searchable(q) else q(x)[None]

    def distance(out_q: Tensor, groups: int) -> Tensor:  # (K, B, H, T, X) -> (K, groups)
        d = out_q - out_fp[None]
        return _head_mean((d if g is None else d * g[None]).pow(2), groups)

    inits = {id(q): get_param(q) for q in (qa, qb) if _searchable(q)}
    first = float(distance(product(current(qa, a), current(qb, b)), 1).mean())
    for _ in range(rounds):
        for q in (qa, qb):
            if not _searchable(q):
                continue
            if q is qa:
                b_q = current(qb, b)
                obj = lambda c: distance(product(_cand_fq(qa, a, c), b_q), c.shape[1])  # noqa: E731
            else:
                a_q = current(qa, a)
                obj = lambda c: distance(product(a_q, _cand_fq(qb, b, c)), c.shape[1])  # noqa: E731
            if isinstance(q, TwinUniformQuantizer):  # the softmax threshold over powers of two
                init, cands = torch.ones(1), [2.0 ** -k for k in range(softmax_k_max + 1)]
            else:
                init, cands = inits[id(q)], list(factors)
            best, _ = search_scale(obj, init, get_param(q), cands, chunk)
            set_param(q, best)
    last = float(distance(product(current(qa, a), current(qb, b)), 1).mean())
    return {"initial": first, "final": last}
