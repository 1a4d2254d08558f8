"""Where a U-Net training step's convolution time goes: every convolution of the network timed
alone (forward, input gradient, kernel gradient), in JAX's formulations and in PyTorch, and the
matmul ceiling of the machine, in one run, and the step rate that ceiling allows.

    python benchmarks/conv_bench.py                        # the 2x2 U-Net (batch 64)
    python benchmarks/conv_bench.py --preset 2x2_small --torch

The network's convolutions are found by tracing it (every ``nn.Conv``/``ConvTranspose``/``Conv``
call, with its input shape), so the table is the network's own. Per-step totals sum the
convolutions' times over every call: a floor for the step under that kernel (elementwise work,
the optimiser and overheads come on top). ``--torch`` times PyTorch's ``conv2d`` (oneDNN on a
CPU) on the same shapes, with the thread count that is faster for the whole table.
"""
from __future__ import annotations

import argparse
import collections
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept import config as C, data as D, nets
from jaxconcept.nets import conv as convs


def network_convs(cfg: C.Config) -> collections.Counter:
    """{(kind, input shape [B, H, W, C], kernel k, stride, features): calls} of one forward pass."""
    spec = D.spec(cfg.data)
    net = nets.build(C.override(cfg, ['model.conv="xla"']).model, spec)
    found = collections.Counter()

    def record(next_fun, args, kwargs, ctx):
        m = ctx.module
        if ctx.method_name == "__call__" and isinstance(m, (nn.Conv, nn.ConvTranspose)):
            kind = "transpose" if isinstance(m, nn.ConvTranspose) else "conv"
            found[(kind, tuple(args[0].shape), m.kernel_size[0], m.strides[0], m.features)] += 1
        return next_fun(*args, **kwargs)

    b = cfg.train.batch_size
    x, t, c = nets.example_inputs(spec, b)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, t, c, False))
    return found


def _timeit(f, *args, min_time=0.5):
    jax.block_until_ready(f(*args))
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_time:
        out = f(*args)
        n += 1
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def jax_times(key, impl: str, min_time: float) -> dict:
    """Seconds of forward, input gradient and kernel gradient of one convolution in ``impl``."""
    kind, shape, k, stride, feats = key
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    m = convs.make(impl, feats, k, stride=stride, transpose=kind == "transpose", init=nn.initializers.normal(0.1),
                   name="c", dtype=jnp.float32)
    p = m.init(jax.random.PRNGKey(1), x)
    y = m.apply(p, x)
    dy = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    fwd = jax.jit(m.apply)
    _, vjp_x = jax.vjp(lambda x: m.apply(p, x), x)
    _, vjp_p = jax.vjp(lambda p: m.apply(p, x), p)
    dgrad, wgrad = jax.jit(lambda dy: vjp_x(dy)), jax.jit(lambda dy: vjp_p(dy))
    return {"fwd": _timeit(fwd, p, x, min_time=min_time), "dgrad": _timeit(dgrad, dy, min_time=min_time),
            "wgrad": _timeit(wgrad, dy, min_time=min_time)}


def torch_times(key, min_time: float) -> dict:
    import torch

    kind, (b, h, w, c), k, stride, feats = key
    x = torch.randn(b, c, h, w, requires_grad=True)
    if kind == "transpose":
        conv = torch.nn.ConvTranspose2d(c, feats, k, stride=k)
    else:
        conv = torch.nn.Conv2d(c, feats, k, stride=stride, padding=k // 2 if stride == 1 else 0)
    y = conv(x)
    dy = torch.randn_like(y)

    def run(fn):
        fn()
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < min_time:
            fn()
            n += 1
        return (time.perf_counter() - t0) / n

    with torch.no_grad():
        t_fwd = run(lambda: conv(x))
    t_dx = run(lambda: torch.autograd.grad(conv(x), x, dy, retain_graph=False))
    t_dw = run(lambda: torch.autograd.grad(conv(x), conv.weight, dy, retain_graph=False))
    return {"fwd": t_fwd, "dgrad": max(t_dx - t_fwd, 1e-9), "wgrad": max(t_dw - t_fwd, 1e-9)}


def flops(key) -> float:
    """Multiply-adds x 2 of one pass (forward, or either gradient) of the convolution."""
    kind, (b, h, w, c), k, stride, feats = key
    out_hw = h * w * (k * k if kind == "transpose" else 1) // (1 if kind == "transpose" else stride * stride)
    return 2.0 * b * out_hw * feats * c * (1 if kind == "transpose" else k * k)


def matmul_rate(n=2048, min_time=1.0) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    return 2 * n ** 3 / _timeit(jax.jit(lambda a: a @ a), a, min_time=min_time)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2x2")
    ap.add_argument("--impl", default="xla,explicit", help="comma-separated model.conv formulations")
    ap.add_argument("--torch", action="store_true", help="also time PyTorch's conv2d on the same shapes")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    a = ap.parse_args()
    cfg = C.preset(a.preset)
    found = network_convs(cfg)
    impls = a.impl.split(",")
    peak = matmul_rate()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; preset {a.preset}, batch {cfg.train.batch_size}; "
          f"2048^2 float32 matmul: {peak / 1e9:.0f} GFLOP/s", flush=True)
    cols = [*impls] + (["torch"] if a.torch else [])
    if a.torch:
        import torch
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    totals = {c: collections.Counter() for c in cols}
    print(f"{'conv (kind, input, k, stride, out)':52s} {'calls':>5} " + " ".join(f"{c + ' f/dx/dw GFLOP/s':>26}" for c in cols))
    for key, calls in sorted(found.items(), key=lambda kv: -flops(kv[0]) * kv[1]):
        row = []
        for c in cols:
            t = torch_times(key, a.min_time) if c == "torch" else jax_times(key, c, a.min_time)
            for part, s in t.items():
                totals[c][part] += calls * s
            row.append("/".join(f"{flops(key) / s / 1e9:.0f}" for s in t.values()))
        print(f"{str(key):52s} {calls:>5} " + " ".join(f"{r:>26}" for r in row), flush=True)
    total_flops = sum(flops(k) * n for k, n in found.items())
    print(f"\nper training step (forward + input and kernel gradients of every call; conv_in's input gradient "
          f"included), {3 * total_flops / 1e9:.0f} GFLOP:")
    for c in cols:
        s = sum(totals[c].values())
        parts = ", ".join(f"{p} {v:.2f} s" for p, v in totals[c].items())
        print(f"  {c:>9}: {s:.2f} s ({parts}): {3 * total_flops / s / 1e9:.0f} GFLOP/s, "
              f"at most {1 / s:.3f} steps/s from convolutions alone")
    print(f"  every convolution at the matmul's {peak / 1e9:.0f} GFLOP/s: {3 * total_flops / peak:.2f} s, "
          f"at most {peak / (3 * total_flops):.3f} steps/s (the floor for this arithmetic on this machine)")


if __name__ == "__main__":
    main()
