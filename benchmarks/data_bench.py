"""Throughput of the image generator G: jit + vmap on the default JAX device against a
straightforward numpy per-image loop, measured in the same run.

    python benchmarks/data_bench.py [--n 4096]
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from jaxconcept import config as C, data as D


def numpy_render(z, rng, size=32, sigma=1.0, noise=0.001):
    """One image the plain way (hard mask, separable blur with np.convolve)."""
    g = np.linspace(-1, 1, size)
    dx, dy = g[:, None] - z[2], g[None, :] - z[3]
    circle = (np.sqrt(dx ** 2 + dy ** 2) < z[7]).astype(np.float32)
    side = z[7] * math.sqrt(4 * math.pi / math.sqrt(3))
    r_in = side / (2 * math.sqrt(3))
    d = np.max([np.cos(a) * dx + np.sin(a) * dy for a in np.deg2rad([-90, 30, 150])], axis=0) - r_in
    m = z[0] * circle + z[1] * (d < 0)
    k = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
    k /= k.sum()
    m = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 0, m)
    m = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, m)[..., None]
    img = m * z[4:7] + (1 - m) * z[8:11] + noise * rng.standard_normal((size, size, 3))
    return np.clip(img, 0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--n-numpy", type=int, default=256)
    a = ap.parse_args()
    cfg = C.preset("2x2").data
    spec, params = D.spec(cfg), D.params(cfg)
    labels = jax.numpy.asarray(np.arange(a.n) % spec.n_classes)
    f = jax.jit(lambda k: D.sample(spec, params, k, labels)[0])
    jax.block_until_ready(f(jax.random.PRNGKey(0)))
    t = time.perf_counter()
    for i in range(3):
        jax.block_until_ready(f(jax.random.PRNGKey(i)))
    jax_rate = 3 * a.n / (time.perf_counter() - t)
    lo, hi = np.asarray(params["lo"]), np.asarray(params["hi"])
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(a.n_numpy):
        c = i % spec.n_classes
        numpy_render(lo[c] + (hi[c] - lo[c]) * rng.random(11), rng)
    np_rate = a.n_numpy / (time.perf_counter() - t)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"G, jit+vmap, batch {a.n}: {jax_rate:,.0f} images/s")
    print(f"numpy per-image loop:     {np_rate:,.0f} images/s")
    print(f"ratio: {jax_rate / np_rate:.1f}x")


if __name__ == "__main__":
    main()
