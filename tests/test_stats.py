"""s2d.stats against independent computations: closed forms, brute-force enumeration, simulations."""
import itertools
import math
import re
import time
from fractions import Fraction

import numpy as np
import pytest

from s2d.stats import (
    Comparison,
    Estimate,
    cell_estimate,
    format_comparison,
    format_estimate,
    paired_comparison,
    sign_flip_pvalue,
)


def _bernoulli(rng, p, shape):
    return (rng.random(shape) < p).astype(np.int64)


def _enumerated_pvalue(diffs):
    """Exact sign-flip p-value by listing all 2^D sign assignments of the non-zero diffs."""
    d = np.asarray(diffs, dtype=np.float64).ravel()
    d = d[d != 0]
    observed = abs(d.sum())
    hits = sum(abs(np.dot(signs, d)) >= observed - 1e-12 for signs in itertools.product((-1.0, 1.0), repeat=d.size))
    return hits / 2**d.size


def _binomial_two_sided(x, D):
    """P(|2X - D| >= |2x - D|), X ~ Binomial(D, 1/2), summed over every k with exact fractions."""
    t = abs(2 * x - D)
    return float(sum(Fraction(math.comb(D, k), 2**D) for k in range(D + 1) if abs(2 * k - D) >= t))


# 1. closed form for a binomial proportion
def test_cell_estimate_matches_binomial_closed_form():
    rng = np.random.default_rng(0)
    x = _bernoulli(rng, 0.7, 2000)
    e = cell_estimate(x, resamples=4000, seed=1)
    p = x.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / x.size)
    assert e.mean == float(np.mean(x))
    assert abs(e.lo - (p - half)) <= 0.1 * half
    assert abs(e.hi - (p + half)) <= 0.1 * half
    assert e.lo <= e.mean <= e.hi
    assert (e.seeds, e.examples) == (1, 2000)
    # bool input, 2-D input with one seed: same numbers
    assert cell_estimate(x.astype(bool), resamples=4000, seed=1) == e
    assert cell_estimate(x[None, :], resamples=4000, seed=1) == e


def test_bootstrap_is_seeded_and_fast():
    rng = np.random.default_rng(1)
    x = _bernoulli(rng, 0.7, (3, 1280))
    t0 = time.perf_counter()
    e = cell_estimate(x, resamples=2000, seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0  # measured ~0.04 s: vectorised over chunks of replicates
    assert cell_estimate(x, resamples=2000, seed=3) == e
    assert cell_estimate(x, resamples=2000, seed=4) != e
    assert e.mean == float(x.mean()) and (e.seeds, e.examples) == (3, 1280)


# 2. brute-force permutation test
@pytest.mark.parametrize("case", range(6))
def test_sign_flip_exact_matches_enumeration(case):
    rng = np.random.default_rng(100 + case)
    while True:
        arm, base = _bernoulli(rng, 0.6, (2, 6)), _bernoulli(rng, 0.5, (2, 6))
        d = arm - base
        if 0 < np.count_nonzero(d) <= 12:
            break
    assert abs(sign_flip_pvalue(d) - _enumerated_pvalue(d)) < 1e-12
    assert abs(paired_comparison(arm, base).p - _enumerated_pvalue(d)) < 1e-12


def test_sign_flip_exact_edge_cases():
    assert sign_flip_pvalue(np.zeros((2, 6))) == 1.0  # D = 0
    assert sign_flip_pvalue([1, -1, 0, 1, -1]) == 1.0  # observed sum 0
    assert sign_flip_pvalue([1] * 10) == pytest.approx(2 / 2**10, abs=1e-15)
    assert sign_flip_pvalue([-1] * 10 + [0] * 5) == sign_flip_pvalue([1] * 10)


def test_sign_flip_monte_carlo_matches_enumeration():
    rng = np.random.default_rng(7)
    d = rng.normal(0.5, 1.0, size=10)
    exact = _enumerated_pvalue(d)
    assert 0.02 < exact < 0.9  # a case where the tolerance below means something
    p = sign_flip_pvalue(d, resamples=20000, seed=0)
    assert abs(p - exact) < 0.01  # Monte-Carlo s.e. <= 0.0036
    assert sign_flip_pvalue(d, resamples=20000, seed=0) == p  # seeded
    # (1 + hits) / (1 + R): never 0, even for an extreme statistic
    assert sign_flip_pvalue(np.full(40, 0.3) + np.linspace(0, 0.1, 40), resamples=999) == pytest.approx(1 / 1000)


# 3. exact McNemar cross-checks
XD = [(0, 1), (1, 2), (2, 10), (3, 11), (12, 37), (75, 200), (690, 1500), (725, 1500), (750, 1500), (500, 1500)]


def _pm_ones(x, D, zeros=3):
    return np.array([1] * x + [-1] * (D - x) + [0] * zeros)


@pytest.mark.parametrize("x,D", XD)
def test_exact_matches_fraction_binomial_tail(x, D):
    expected = _binomial_two_sided(x, D)
    assert sign_flip_pvalue(_pm_ones(x, D)) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("x,D", XD)
def test_exact_matches_scipy_binomtest(x, D):
    scipy_stats = pytest.importorskip("scipy.stats")
    assert sign_flip_pvalue(_pm_ones(x, D)) == pytest.approx(scipy_stats.binomtest(x, D, 0.5).pvalue, rel=1e-9)


# 4. known effect
def _correlated_arms(rng, p_arm, p_base, shape, shared=0.5):
    """0/1 outcomes with exact marginals p_arm / p_base, correlated through a per-example difficulty u_j
    that each (arm, seed, example) uses with probability `shared` (otherwise a fresh uniform)."""
    u = rng.random(shape[-1])
    draws = []
    for p in (p_arm, p_base):
        latent = np.where(rng.random(shape) < shared, u, rng.random(shape))
        draws.append((latent < p).astype(np.int64))
    return draws


def test_known_effect_is_detected():
    rng = np.random.default_rng(2024)
    arm, base = _correlated_arms(rng, 0.76, 0.70, (3, 1280))
    c = paired_comparison(arm, base)
    assert c.significant and c.lo > 0
    assert c.p < 0.01
    assert c.lo <= 0.06 <= c.hi
    assert c.delta == pytest.approx(arm.mean() - base.mean(), abs=1e-15)
    assert (c.seeds, c.examples) == (3, 1280)
    wins, losses = c.discordant
    assert wins == int(((arm == 1) & (base == 0)).sum()) and losses == int(((arm == 0) & (base == 1)).sum())
    assert (wins - losses) == int((arm - base).sum())


# 5. null calibration
def _null_rates(seeds, sims=300, n=200, resamples=500):
    rng = np.random.default_rng(seeds)
    fp_ci = fp_p = 0
    for i in range(sims):
        arm, base = _correlated_arms(rng, 0.7, 0.7, (seeds, n))
        c = paired_comparison(arm, base, resamples=resamples, seed=i)
        fp_ci += c.significant
        fp_p += c.p < 0.05
    return fp_ci / sims, fp_p / sims


def test_null_calibration_one_seed():
    # 300 simulated nulls, S = 1, n = 200: both arms drawn from the same distribution.
    # Expected false-positive rate 0.05 for each; the binomial s.e. over 300 nulls is ~0.013.
    fp_ci, fp_p = _null_rates(seeds=1)
    assert 0.01 <= fp_ci <= 0.10
    assert 0.01 <= fp_p <= 0.10


def test_null_calibration_three_seeds():
    # 300 simulated nulls, S = 3, n = 200, no seed effect.  The sign-flip test is exact: expected 0.05
    # (a bit less, binomial discreteness).  The two-way bootstrap also resamples seeds, which with no
    # seed effect double-counts per-example noise: the CI is conservative (about 0.005 in 1000 nulls),
    # so its rate is only bounded above by 0.05.
    fp_ci, fp_p = _null_rates(seeds=3)
    assert 0.01 <= fp_p <= 0.10
    assert fp_ci <= 0.05


@pytest.mark.parametrize("values", ["binary", "real"])
def test_degenerate_null_identical_arms(values):
    rng = np.random.default_rng(5)
    x = _bernoulli(rng, 0.7, (3, 50)) if values == "binary" else rng.normal(size=(3, 50))
    c = paired_comparison(x, x.copy())
    assert c.delta == 0.0 and c.lo == 0.0 and c.hi == 0.0
    assert c.p == 1.0
    assert not c.significant
    assert c.discordant == ((0, 0) if values == "binary" else None)
    assert format_comparison(c) == "+0.00 [+0.00, +0.00]"


# 6. the bootstrap is paired
def test_constant_shift_gives_zero_width_ci():
    rng = np.random.default_rng(6)
    base = rng.normal(size=(3, 50))
    shift = 0.25
    arm = base + shift
    c = paired_comparison(arm, base)
    assert c.delta == pytest.approx(shift, abs=1e-12)
    assert c.lo == pytest.approx(shift, abs=1e-12) and c.hi == pytest.approx(shift, abs=1e-12)
    assert c.hi - c.lo <= 1e-12
    assert c.significant and c.discordant is None
    # unpaired, either arm alone is uncertain: the zero width comes from resampling the pairs together
    alone = cell_estimate(arm)
    assert alone.hi - alone.lo > 0.2


# 7. two-way resampling includes seed variation
def test_seed_variation_widens_the_ci():
    rng = np.random.default_rng(8)
    base = rng.normal(0.0, 1.0, size=400)
    offsets = np.array([-0.5, 0.0, 0.5])  # seed effect
    x = base[None, :] + offsets[:, None]  # (3, 400), the same examples otherwise
    one = cell_estimate(x[1])
    three = cell_estimate(x)
    assert three.mean == pytest.approx(x.mean(), abs=1e-15)
    assert (three.hi - three.lo) > 2.0 * (one.hi - one.lo)
    # no seed effect (identical seeds): seed resampling adds nothing
    same = cell_estimate(np.tile(base, (3, 1)))
    assert (same.hi - same.lo) == pytest.approx(one.hi - one.lo, rel=0.15)


# 8. validation and formatting
@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: paired_comparison(np.zeros((3, 10)), np.zeros((3, 9))),
         "paired_comparison: arm and baseline must have the same shape, got (3, 10) and (3, 9)"),
        (lambda: cell_estimate(np.zeros((2, 3, 4))), "cell_estimate: outcomes must be 1-D"),
        (lambda: cell_estimate(0.5), "cell_estimate: outcomes must be 1-D"),
        (lambda: cell_estimate([]), "cell_estimate: outcomes needs at least 1 seed and 1 example"),
        (lambda: cell_estimate(np.zeros((0, 5))), "cell_estimate: outcomes needs at least 1 seed"),
        (lambda: cell_estimate([0.5, np.nan]), "cell_estimate: outcomes has non-finite values"),
        (lambda: paired_comparison([1.0, 2.0], [np.inf, 0.0]), "paired_comparison: baseline has non-finite"),
        (lambda: paired_comparison([[1]], [[1, 0]]), "paired_comparison: arm and baseline must have the same shape"),
        (lambda: sign_flip_pvalue(np.ones((1, 1, 1))), "sign_flip_pvalue: diffs must be 1-D"),
        (lambda: sign_flip_pvalue([0.5, 0.2], resamples=0), "sign_flip_pvalue: resamples must be >= 1"),
        (lambda: cell_estimate([1, 0], level=1.0), "cell_estimate: level must be in (0, 1)"),
        (lambda: paired_comparison([1, 0], [0, 1], resamples=0), "paired_comparison: resamples must be >= 1"),
    ],
)
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        call()
    assert "\n" not in str(info.value)


def test_format_estimate():
    assert format_estimate(Estimate(0.7135, 0.6894, 0.7376, 3, 1280)) == "71.35 ±2.41"
    assert format_estimate(Estimate(0.7135, 0.6800, 0.7376, 3, 1280)) == "71.35 ±3.35"  # the larger side
    assert format_estimate(Estimate(2.5, 2.25, 2.75, 1, 10), scale=1.0, digits=3) == "2.500 ±0.250"


def test_format_comparison():
    sig = Comparison(0.031, 0.012, 0.05, 0.001, True, 3, 1280, (120, 80))
    assert format_comparison(sig) == "+3.10 [+1.20, +5.00]*"
    assert format_comparison(sig).endswith("*")
    ns = Comparison(-0.005, -0.012, 0.003, 0.4, False, 3, 1280, None)
    assert format_comparison(ns) == "-0.50 [-1.20, +0.30]"
    tiny = Comparison(-1e-9, -1e-9, 1e-9, 1.0, False, 1, 5, None)
    assert format_comparison(tiny) == "+0.00 [+0.00, +0.00]"  # no "-0.00"
    assert format_comparison(sig, scale=1.0, digits=3) == "+0.031 [+0.012, +0.050]*"
    # round trip from a real comparison
    rng = np.random.default_rng(9)
    arm, base = _correlated_arms(rng, 0.76, 0.70, (3, 1280))
    text = format_comparison(paired_comparison(arm, base))
    assert re.fullmatch(r"\+\d+\.\d\d \[\+\d+\.\d\d, \+\d+\.\d\d\]\*", text)
