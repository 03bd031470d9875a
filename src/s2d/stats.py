"""Uncertainty for per-example outcomes over training seeds: bootstrap CIs and a paired sign-flip test.

Every input is an array of shape (S, n): S training seeds by n test examples, where the same example
index is the same test example in every seed and every arm, so comparisons are paired.  A 1-D input
means S = 1.  Values are per-example correctness (0/1 or bool) or any real per-example score (a loss).

* ``cell_estimate``: mean of one arm with a two-way percentile bootstrap CI.
* ``paired_comparison``: arm minus baseline, with the same bootstrap on the paired difference, the
  sign-flip p-value and, for 0/1 outcomes, the discordant-pair counts.
* ``sign_flip_pvalue``: the paired randomisation test; exact (McNemar) for 0/1 outcomes.
* ``format_estimate`` / ``format_comparison``: short strings for tables.

The two-way bootstrap draws seeds with replacement AND examples with replacement (one set of example
indices shared by every drawn seed and both arms), so the CI reflects both seed-to-seed variation and
the finite test set.  The sign-flip test only asks whether, pair by pair, the two arms are exchangeable;
it ignores seed-to-seed variation, so when seeds disagree it is the less conservative of the two.
``Comparison.significant`` therefore uses the CI.

Depends on numpy and the standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Estimate",
    "Comparison",
    "cell_estimate",
    "paired_comparison",
    "sign_flip_pvalue",
    "format_estimate",
    "format_comparison",
]

_CHUNK = 256  # bootstrap / sign-flip replicates drawn per vectorised step


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval (same units as the outcomes, e.g. accuracy in [0, 1])."""

    mean: float  # mean over seeds of the per-seed mean over examples
    lo: float  # lower end of the CI
    hi: float  # upper end of the CI
    seeds: int  # number of seeds
    examples: int  # number of examples per seed


@dataclass(frozen=True)
class Comparison:
    """arm minus baseline, paired over the same seeds and examples.

    ``significant`` is True when the bootstrap CI excludes 0.  The CI includes seed-to-seed variation,
    while the sign-flip p-value only tests per-example exchangeability of the two arms; the verdict
    uses the CI, the more conservative of the two when seeds vary.
    """

    delta: float  # point estimate of mean(arm) - mean(baseline)
    lo: float  # lower end of the CI of the difference
    hi: float  # upper end of the CI of the difference
    p: float  # two-sided p-value of the paired sign-flip test
    significant: bool  # the CI excludes 0
    seeds: int
    examples: int
    discordant: tuple[int, int] | None  # 0/1 outcomes: (# arm right & baseline wrong, # the reverse); else None


def _as_2d(x, name: str, fn: str) -> np.ndarray:
    """``x`` as a float64 (S, n) array (1-D -> (1, n)); ValueError naming ``fn`` and ``name`` if invalid."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"{fn}: {name} must be 1-D (n,) or 2-D (seeds, examples), got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{fn}: {name} needs at least 1 seed and 1 example, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{fn}: {name} has non-finite values (nan or inf)")
    return a


def _check_level(level: float, resamples: int, fn: str) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"{fn}: level must be in (0, 1), got {level}")
    if int(resamples) < 1:
        raise ValueError(f"{fn}: resamples must be >= 1, got {resamples}")


def _counts(rng: np.random.Generator, k: int, size: int) -> np.ndarray:
    """(size, k) multiplicities of k indices drawn with replacement from range(k), one row per replicate."""
    idx = rng.integers(0, k, size=(size, k))
    idx += (np.arange(size) * k)[:, None]
    return np.bincount(idx.ravel(), minlength=size * k).reshape(size, k).astype(np.float64)


def _bootstrap_ci(x: np.ndarray, level: float, resamples: int, seed: int) -> tuple[float, float]:
    """Two-way percentile bootstrap CI of the mean of x (S, n).

    Each replicate draws S seed indices and n example indices with replacement (the example indices are
    shared by all drawn seeds); its statistic is the mean of the resampled S x n block, computed from the
    multiplicities w (S,) and c (n,) as ``w @ x @ c / (S n)``.  With S = 1 only examples are resampled.
    """
    s, n = x.shape
    rng = np.random.Generator(np.random.PCG64(seed))
    reps = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        w = _counts(rng, s, b) if s > 1 else np.ones((b, 1))  # (b, S)
        c = _counts(rng, n, b)  # (b, n)
        reps[start : start + b] = ((w @ x) * c).sum(axis=1) / (s * n)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def cell_estimate(outcomes, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of ``outcomes`` (S, n) (or (n,)) with a two-way percentile bootstrap CI at ``level``.

    The point estimate is the mean of all S*n values (the mean over seeds of the per-seed means).
    The CI resamples seeds and examples (see module docstring), ``resamples`` replicates from
    ``numpy.random.Generator(seed)``.
    """
    fn = "cell_estimate"
    x = _as_2d(outcomes, "outcomes", fn)
    _check_level(level, resamples, fn)
    lo, hi = _bootstrap_ci(x, level, int(resamples), seed)
    return Estimate(mean=float(x.mean()), lo=lo, hi=hi, seeds=x.shape[0], examples=x.shape[1])


def paired_comparison(arm, baseline, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Comparison:
    """``arm`` minus ``baseline``, both (S, n) (or (n,)) with the same seeds and examples in the same order.

    delta is mean(arm) - mean(baseline); the CI is the two-way bootstrap of the paired difference
    ``arm - baseline`` (the same seed and example draws for both arms), ``resamples`` replicates.
    p is ``sign_flip_pvalue(arm - baseline, seed=seed)`` (exact for 0/1 outcomes, otherwise its default
    Monte-Carlo resamples).  ``significant`` means the CI excludes 0: the CI includes seed-to-seed
    variation while the p-value only tests per-example exchangeability, so the CI is the more
    conservative verdict when seeds vary.  ``discordant`` counts, for 0/1 outcomes, the pairs where only
    the arm is right and where only the baseline is right, summed over seeds.
    """
    fn = "paired_comparison"
    a = _as_2d(arm, "arm", fn)
    b = _as_2d(baseline, "baseline", fn)
    if a.shape != b.shape:
        raise ValueError(f"{fn}: arm and baseline must have the same shape, got {a.shape} and {b.shape}")
    _check_level(level, resamples, fn)
    d = a - b
    lo, hi = _bootstrap_ci(d, level, int(resamples), seed)
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    discordant = (int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())) if binary else None
    return Comparison(
        delta=float(d.mean()),
        lo=lo,
        hi=hi,
        p=sign_flip_pvalue(d, seed=seed),
        significant=bool(lo > 0.0 or hi < 0.0),
        seeds=a.shape[0],
        examples=a.shape[1],
        discordant=discordant,
    )


def _exact_sign_pvalue(num_nonzero: int, abs_sum: int) -> float:
    """P(|2X - D| >= t) for X ~ Binomial(D, 1/2), with exact integer arithmetic (D = num_nonzero, t = abs_sum)."""
    if num_nonzero == 0 or abs_sum == 0:
        return 1.0
    # |2X - D| >= t  <=>  X <= (D - t) / 2  or  X >= (D + t) / 2; the two tails are disjoint and symmetric.
    k_max = (num_nonzero - abs_sum) // 2
    tail, c = 0, 1
    for k in range(k_max + 1):
        tail += c
        c = c * (num_nonzero - k) // (k + 1)
    return min(1.0, 2 * tail / 2**num_nonzero)  # int / int is correctly rounded for big ints


def sign_flip_pvalue(diffs, resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip test on ``diffs`` (S, n) (or (n,)) = arm - baseline.

    Sharp null: in every (seed, example) pair the two arms are exchangeable, so each diff's sign is a
    fair coin; statistic |sum of diffs|.  This tests per-example exchangeability only, not seed-to-seed
    variation.

    * All diffs in {-1, 0, 1} (0/1 outcomes): exact.  With D non-zero diffs the null statistic is
      |2X - D|, X ~ Binomial(D, 1/2), i.e. the exact McNemar test on the discordant pairs pooled over
      seeds; D = 0 gives 1.
    * Otherwise Monte-Carlo with ``resamples`` random sign vectors from ``numpy.random.Generator(seed)``:
      p = (1 + #{|stat*| >= |stat|}) / (1 + resamples), ties judged with a 1e-10 relative tolerance.
    """
    fn = "sign_flip_pvalue"
    d = _as_2d(diffs, "diffs", fn).ravel()
    if int(resamples) < 1:
        raise ValueError(f"{fn}: resamples must be >= 1, got {resamples}")
    if np.isin(d, (-1.0, 0.0, 1.0)).all():
        return _exact_sign_pvalue(int(np.count_nonzero(d)), abs(int(d.sum())))
    resamples = int(resamples)
    d = d[d != 0.0]
    total = d.sum()
    observed = abs(total) - 1e-10 * np.abs(d).sum()
    rng = np.random.Generator(np.random.PCG64(seed))
    nbytes = (d.size + 7) // 8
    hits = 0
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        bits = np.unpackbits(rng.integers(0, 256, size=(b, nbytes), dtype=np.uint8), axis=1)[:, : d.size]
        flipped = 2.0 * (bits @ d) - total  # sum of d * (+1 where bit = 1, -1 where bit = 0)
        hits += int((np.abs(flipped) >= observed).sum())
    return (1 + hits) / (1 + resamples)


def _signed(v: float, digits: int) -> str:
    return f"{round(v, digits) + 0.0:+.{digits}f}"  # "+ 0.0" turns -0.0 into 0.0 (no "-0.00")


def format_estimate(e: Estimate, scale: float = 100.0, digits: int = 2) -> str:
    """``"mean ±half"`` in ``scale`` units (accuracy in %, by default), half = max(mean - lo, hi - mean)."""
    half = max(e.mean - e.lo, e.hi - e.mean, 0.0)
    return f"{round(e.mean * scale, digits) + 0.0:.{digits}f} ±{half * scale:.{digits}f}"


def format_comparison(c: Comparison, scale: float = 100.0, digits: int = 2) -> str:
    """``"+delta [+lo, +hi]"`` with explicit signs, in ``scale`` units; ``"*"`` appended when significant."""
    text = f"{_signed(c.delta * scale, digits)} [{_signed(c.lo * scale, digits)}, {_signed(c.hi * scale, digits)}]"
    return text + ("*" if c.significant else "")
