"""s2d.spectral against torch.linalg.svd and a brute-force evaluation of paper eq. 2."""
import pytest
import torch

from s2d.spectral import Spectrum, pcdr_curve, select_rank, spectra, spectrum, top_k


def _matrix(kind: str, m: int, n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    if kind == "spiked":  # a few dominant directions on top of a random bulk
        for s in (20.0, 8.0, 4.0):
            u, v = torch.randn(m, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
            w += s * torch.outer(u / u.norm(), v / v.norm())
    return w.to(dtype)


CASES = [(kind, m, n) for kind in ("random", "spiked") for (m, n) in ((48, 80), (80, 48), (64, 64), (1, 7), (9, 1))]


@pytest.mark.parametrize("kind,m,n", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectrum_matches_svd(kind, m, n, dtype):
    w = _matrix(kind, m, n, dtype)
    s = spectrum(w)
    U0, S0, V0h = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(m, n)
    assert s.U.shape == (m, r) and s.S.shape == (r,) and s.V.shape == (n, r)
    assert torch.all(s.S[:-1] >= s.S[1:]) and torch.all(s.S >= 0)
    eps = 1e-5 if dtype == torch.float32 else 1e-10
    # leading values to eps relative; the Gram matrix resolves the tail to ~sqrt(eps) * sigma_max
    tail = 1e-3 if dtype == torch.float32 else 1e-7
    torch.testing.assert_close(s.S.double(), S0, rtol=0, atol=tail * float(S0[0]))
    k = min(3, r)
    torch.testing.assert_close(s.S[:k].double(), S0[:k], rtol=eps, atol=0)
    for kk in range(1, k + 1):  # top-k reconstruction equals the SVD's (unique: distinct sigmas)
        t = top_k(s, kk)
        ours = t.U.double() @ torch.diag(t.S.double()) @ t.V.double().T
        ref = U0[:, :kk] @ torch.diag(S0[:kk]) @ V0h[:kk]
        torch.testing.assert_close(ours, ref, rtol=0, atol=20 * eps * float(S0[0]))
    full = s.U.double() @ torch.diag(s.S.double()) @ s.V.double().T
    torch.testing.assert_close(full, w.double(), rtol=0, atol=20 * eps * float(S0[0]))
    # the eigenvector side is orthonormal to rounding; the leading columns of the other side too
    small, big = (s.U, s.V) if m <= n else (s.V, s.U)
    torch.testing.assert_close(small.double().T @ small.double(), torch.eye(r, dtype=torch.float64), rtol=0, atol=10 * eps)
    lead = big[:, :k].double()
    torch.testing.assert_close(lead.T @ lead, torch.eye(k, dtype=torch.float64), rtol=0, atol=10 * eps)


def test_rank_deficient_gets_orthonormal_completion():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 30, generator=g, dtype=torch.float64)
    s = spectrum(w)
    S0 = torch.linalg.svdvals(w)
    torch.testing.assert_close(s.S, S0, rtol=0, atol=1e-10 * float(S0[0]))
    assert torch.all(s.S[4:] == 0)
    eye = torch.eye(30, dtype=torch.float64)
    torch.testing.assert_close(s.U.T @ s.U, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(s.V.T @ s.V, eye, rtol=0, atol=1e-8)
    torch.testing.assert_close(s.U @ torch.diag(s.S) @ s.V.T, w, rtol=0, atol=1e-10 * float(S0[0]))


def test_spectra_batches_by_shape_and_keeps_order():
    ws = [_matrix("spiked", 24, 40, seed=i) if i % 2 else _matrix("random", 40, 24, seed=i) for i in range(6)]
    for w, s in zip(ws, spectra(ws)):
        assert s.U.shape[0] == w.shape[0] and s.V.shape[0] == w.shape[1]
        torch.testing.assert_close(s.S.double(), torch.linalg.svdvals(w.double()), rtol=0, atol=1e-5 * float(s.S[0]))
    assert spectra([]) == []


def test_spectrum_compute_dtype_float64_is_exact_on_float32_weight():
    w = _matrix("random", 64, 64)
    s = spectrum(w, compute_dtype=torch.float64)
    assert s.S.dtype == torch.float64
    torch.testing.assert_close(s.S, torch.linalg.svdvals(w.double()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 3, 4), torch.ones(0, 3),
                                 torch.tensor([[1.0, float("nan")]]), torch.tensor([[float("inf"), 1.0]])])
def test_spectrum_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        spectrum(bad)


def _pcdr_brute(w: torch.Tensor, x: torch.Tensor, i: int) -> list[float]:
    """Paper eq. 2 with explicit loops over the SVD of torch.linalg.svd (float64)."""
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    x = x.double()
    terms = [abs(float(S[r] * U[i, r] * (Vh[r] @ x))) for r in range(S.shape[0])]
    total = sum(terms)
    return [sum(terms[: k + 1]) / total for k in range(len(terms))]


@pytest.mark.parametrize("kind,m,n", [("random", 30, 50), ("spiked", 50, 30), ("spiked", 40, 40), ("random", 1, 5)])
def test_pcdr_curve_matches_brute_force(kind, m, n):
    w = _matrix(kind, m, n)
    x = torch.randn(n)
    i = int((w @ x).abs().argmax())
    c = pcdr_curve(w, x, i)
    assert c.shape == (min(m, n),)
    ref = torch.tensor(_pcdr_brute(w, x, i), dtype=torch.float64)
    # float32 spectrum: PCDR_1..3 to 1e-5 (all S2D uses), the tail of the curve to 1e-3
    torch.testing.assert_close(c[:3], ref[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(c, ref, rtol=0, atol=1e-3)
    c64 = pcdr_curve(w, x, i, spectrum=spectrum(w, compute_dtype=torch.float64))
    torch.testing.assert_close(c64, ref, rtol=0, atol=1e-9)
    # reusing a precomputed spectrum gives the same curve; eq. 1: the terms sum to the activation
    torch.testing.assert_close(pcdr_curve(w, x, i, spectrum=spectrum(w)), c)
    s = spectrum(w, compute_dtype=torch.float64)
    a = (s.S * s.U[i] * (s.V.T @ x.double())).sum()
    torch.testing.assert_close(a, (w.double() @ x.double())[i], rtol=1e-10, atol=1e-10)


def test_pcdr_curve_dominant_direction_and_zero_activation():
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(32, generator=g), torch.randn(48, generator=g)
    w = 10 * torch.outer(u / u.norm(), v / v.norm()) + 1e-3 * torch.randn(32, 48, generator=g)
    x = v / v.norm()
    i = int((w @ x).abs().argmax())
    assert float(pcdr_curve(w, x, i)[0]) > 0.999
    assert torch.all(pcdr_curve(w, torch.zeros(48), i) == 0)
    with pytest.raises(ValueError):
        pcdr_curve(w, torch.zeros(47), 0)
    with pytest.raises(ValueError):
        pcdr_curve(w, x, 32)


@pytest.mark.parametrize("curve,tau,k_max,expected", [
    ([0.96, 0.98, 1.0], 0.95, 3, 1),
    ([0.50, 0.95, 1.0], 0.95, 3, 2),
    ([0.20, 0.40, 0.94, 0.99], 0.95, 3, None),
    ([0.20, 0.40, 0.94, 0.99], 0.95, 4, 4),
    ([0.3, 1.0], 0.95, 5, 2),
    ([0.3, 0.5], 1.0, 2, None),
])
def test_select_rank(curve, tau, k_max, expected):
    assert select_rank(torch.tensor(curve, dtype=torch.float64), tau, k_max) == expected


@pytest.mark.parametrize("tau,k_max", [(0.0, 3), (1.5, 3), (0.9, 0)])
def test_select_rank_rejects_bad_arguments(tau, k_max):
    with pytest.raises(ValueError):
        select_rank(torch.ones(3), tau, k_max)


def test_top_k_clips_and_validates():
    s = spectrum(_matrix("random", 6, 4))
    t = top_k(s, 10)
    assert isinstance(t, Spectrum) and t.S.shape == (4,) and t.U.shape == (6, 4)
    with pytest.raises(ValueError):
        top_k(s, 0)
