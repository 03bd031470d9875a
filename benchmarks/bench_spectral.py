"""One full S2D refresh over the 48 Linear shapes of a ViT-B/16: Gram+eigh (batched) vs a loop of SVDs.

Prints JSON: median seconds of both paths (interleaved repeats), their ratio, and the max relative error
of σ_1..σ_3 and the max absolute error of PCDR_3 of our path against torch.linalg.svd, same dtype.

    python benchmarks/bench_spectral.py [--device cuda] [--dtype float32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from s2d.spectral import Spectrum, pcdr_curve, spectra

VIT_B16 = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12


def make_layers(device: str, dtype: torch.dtype, seed: int = 0):
    """Random weights with a few planted dominant directions; one input row per layer and its argmax neuron."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for m, n in VIT_B16:
        w = torch.randn(m, n, generator=g) * 0.02
        for s in (3.0, 1.5, 1.0):
            u, v = torch.randn(m, generator=g), torch.randn(n, generator=g)
            w += s * torch.outer(u / u.norm(), v / v.norm())
        x = torch.randn(n, generator=g)
        i = int((w @ x).abs().argmax())
        layers.append((w.to(device, dtype), x.to(device, dtype), i))
    return layers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(layers):
    specs = spectra([w for w, _, _ in layers])
    return specs, [pcdr_curve(w, x, i, spectrum=s)[:3] for (w, x, i), s in zip(layers, specs)]


def svd_loop(layers):
    specs, curves = [], []
    for w, x, i in layers:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        s = Spectrum(U=U, S=S, V=Vh.T)
        specs.append(s)
        curves.append(pcdr_curve(w, x, i, spectrum=s)[:3])
    return specs, curves


def timed(fn, layers, device):
    sync(device)
    t = time.perf_counter()
    out = fn(layers)
    sync(device)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    layers = make_layers(args.device, dtype)
    timed(ours, layers[:4], args.device)           # warm-up (kernels, allocator, cuSOLVER handles)
    timed(svd_loop, layers[:4], args.device)
    t_ours, t_svd = [], []
    for _ in range(args.repeats):                  # interleaved so both see the same machine load
        t, (specs, curves) = timed(ours, layers, args.device)
        t_ours.append(t)
        t, (ref_specs, ref_curves) = timed(svd_loop, layers, args.device)
        t_svd.append(t)
    sig_err = max(float(((a.S[:3].double() - b.S[:3].double()).abs() / b.S[:3].double()).max())
                  for a, b in zip(specs, ref_specs))
    pcdr_err = max(float((a[2] - b[2]).abs()) for a, b in zip(curves, ref_curves))
    mo, ms = statistics.median(t_ours), statistics.median(t_svd)
    print(json.dumps({
        "benchmark": "spectral_refresh_vit_b16", "layers": len(layers), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": args.dtype, "repeats": args.repeats, "torch": torch.__version__,
        "ours_s_median": mo, "svd_loop_s_median": ms, "speedup": ms / mo,
        "ours_s_all": t_ours, "svd_loop_s_all": t_svd,
        "max_rel_err_sigma1_3": sig_err, "max_abs_err_pcdr3": pcdr_err,
    }, indent=2))


if __name__ == "__main__":
    main()
