"""Training throughput: stacked members (one jitted scan+vmap call) vs a Python loop over members.

Prints model-steps/s and achieved FLOP/s (XLA's cost analysis of one member's training step) for
each stack size, and the speed-up over the loop baseline measured in the same run.

    python benchmarks/train_bench.py                       # reference 2x2 U-Net: 1/4/16 members (CPU: 1)
    python benchmarks/train_bench.py --preset vec2x2 --members 64
    python benchmarks/train_bench.py --strategy vmap,unroll          # CPU: grouped convs vs unrolled
    python benchmarks/train_bench.py --strategy vmap,map --dtype bfloat16   # on an accelerator
    python benchmarks/train_bench.py --preset vec2x2 --members 64 --steps 20 --reference /tmp/reference
    python benchmarks/train_bench.py --conv xla,explicit --no-loop --reference /tmp/reference   # CPU: the 2x2 U-Net
    python benchmarks/train_bench.py --preset 2x2_small --conv xla,explicit --steps 20 --reps 3 --no-loop \
        --reference /tmp/reference                         # CPU: the small U-Net (16x16, widths 16/32)

``--reference PATH`` (a checkout of the reference, with PyTorch installed; never a dependency of
this project) also times the reference's own training step of one model, as its training loop
runs it (its network and VDM, AdamW lr/weight decay of the config, gradient clipping, one
``loss.item()`` per step), before and after the JAX measurements of the same run, and prints
every rate as a ratio to it. On a CPU it is timed with PyTorch's default intra-op threads and
with one thread, and the faster counts (on a busy machine PyTorch's spinning workers can be
many times slower than one thread).

``--steps K`` is the number of training steps per compiled call (``train.steps_per_call``, one
``lax.scan``); a configuration that cannot step inside a scan (``model.conv="xla"`` for a U-Net
on CPU, not ``nets.loop_safe``) is timed one step per call. ``--conv`` compares convolution
formulations (``model.conv``, ``jaxconcept.nets.conv``) in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from jaxconcept import config as C
from jaxconcept import vdm, nets
from jaxconcept.train import plan, stack


def _time_advance(sw, state, data, k, reps):
    state, loss = stack.advance(sw, state, data, k)  # compile + warm-up
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(reps):
        state, loss = stack.advance(sw, state, data, k)
    jax.block_until_ready(loss)
    return (time.perf_counter() - t0) / (reps * k)  # seconds per step of the whole stack


def bench(cfg: C.Config, n_members: int, k: int, reps: int, loop: bool):
    seeds = list(range(n_members))
    cfg = C.override(cfg, [f"seeds={seeds}", f"train.steps_per_call={k}", "data.n_per_class=256"])
    if loop:  # baseline: one compiled single-member advance, called once per member in Python
        single = C.members(cfg)[0]
        sw = plan.build(single, jax.devices()[:1])
        k = sw.steps_per_call  # 1 where the network cannot scan (nets.loop_safe)
        states = [stack.init(sw, [m]) for m in C.members(cfg)]
        states[0] = (stack.advance(sw, *states[0], k)[0], states[0][1])  # compile + warm-up (donates)
        jax.block_until_ready(states)  # init and warm-up are dispatched asynchronously: not timed
        t0 = time.perf_counter()
        for _ in range(reps):
            outs = [stack.advance(sw, s, d, k) for s, d in states]
            states = [(o[0], d) for o, (_, d) in zip(outs, states)]
        jax.block_until_ready([o[1] for o in outs])
        return n_members * reps * k / (time.perf_counter() - t0)
    sw = plan.build(cfg)
    state, data = jax.block_until_ready(stack.init(sw))
    return n_members / _time_advance(sw, state, data, sw.steps_per_call, reps)


def reference_rate(reference: str, cfg: C.Config, min_time: float) -> dict:
    """Steps/s of the reference's PyTorch training step of one model (see the module docstring)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reference_torch as R
    import torch

    from jaxconcept import data as D

    why = R.available()
    if why:
        raise RuntimeError(why)
    spec = D.spec(cfg.data)
    if cfg.model.arch == "mlp":
        model = R.build_mlp(reference, cfg.model, spec.x_shape[0], spec.cond_dim)
        x_shape = spec.x_shape
    else:
        model = R.build_unet(reference, cfg.model, spec.x_shape[0], spec.cond_dim)
        h, w, c = spec.x_shape
        x_shape = (c, h, w)
    tc = cfg.train
    threads = [torch.get_num_threads()]
    if R.device_name() == "cpu" and threads[0] > 1:
        threads.append(1)
    by = {}
    for n in threads:
        torch.set_num_threads(n)
        by[n] = R.train_rate(model, x_shape, spec.cond_dim, tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay,
                             clip=tc.grad_clip, min_time=min_time)["steps_per_s"]
    torch.set_num_threads(threads[0])
    best = max(by, key=by.get)
    return {"steps_per_s": by[best], "threads": best, "by_threads": by, "device": R.device_name(),
            "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2x2")
    ap.add_argument("--members", default=None, help="comma-separated stack sizes (default 1,4,16; on CPU 1)")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed call (lax.scan length)")
    ap.add_argument("--reps", type=int, default=2, help="timed calls")
    ap.add_argument("--strategy", default=None, help="comma-separated: vmap, map, unroll (default vmap; on CPU "
                    "unroll for U-Nets)")
    ap.add_argument("--conv", default=None, help="comma-separated model.conv formulations to compare: auto, xla, "
                    "explicit (default: the config's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-loop", action="store_true", help="skip the Python-loop baseline")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--reference", default=None, help="a checkout of the reference: time its PyTorch step too")
    ap.add_argument("--reference-s", type=float, default=5.0, help="seconds per reference measurement")
    a = ap.parse_args()
    cfg = C.override(C.preset(a.preset), [f"model.dtype=\"{a.dtype}\"", *a.sets])
    cpu_unet = jax.default_backend() == "cpu" and cfg.model.arch == "unet"
    strategies = (a.strategy or ("unroll" if cpu_unet else "vmap")).split(",")
    members = a.members or ("1" if cpu_unet else "1,4,16")
    convs = a.conv.split(",") if a.conv else [None]
    flops = vdm.train_step_flops(cfg)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{len(jax.devices())} ({jax.default_backend()}); preset {a.preset}, "
          f"batch {cfg.train.batch_size}, {a.dtype}; {flops / 1e9:.2f} GFLOP per model-step (XLA)")
    refs = []

    def measure_reference(when):
        r = reference_rate(a.reference, cfg, a.reference_s)
        refs.append(r["steps_per_s"])
        th = ", ".join(f"{k} thread(s) {v:.2f}" for k, v in r["by_threads"].items())
        print(f"reference ({when}; PyTorch {r['torch']}, {r['device']}, float32, 1 model): "
              f"{r['steps_per_s']:.3f} steps/s ({th})", flush=True)

    if a.reference:
        measure_reference("before")
    rows = []
    for n in [int(x) for x in members.split(",")]:
        for cv in convs:
            c = C.override(cfg, [f"model.conv=\"{cv}\""]) if cv else cfg
            tag = f"/{cv}" if cv else ""
            if not a.no_loop:
                rows.append((n, "loop" + tag, bench(c, n, a.steps, a.reps, loop=True)))
                print(f"  {n} members, loop{tag}: {rows[-1][2]:.3f} model-steps/s", flush=True)
            for st in strategies:
                rows.append((n, f"{st}{tag}", bench(C.override(c, [f"train.strategy=\"{st}\""]), n, a.steps, a.reps,
                                                    loop=False)))
                print(f"  {n} members, stack-{st}{tag} (K={a.steps if nets.loop_safe(c.model) else 1}): "
                      f"{rows[-1][2]:.3f} model-steps/s", flush=True)
    if a.reference:
        measure_reference("after")
    ref = sum(refs) / len(refs) if refs else None
    print()
    print(f"{'members':>8} {'mode':>16} {'model-steps/s':>14} {'GFLOP/s':>10} {'vs loop':>8} {'vs ref':>8}")
    if ref:
        print(f"{1:>8} {'reference':>16} {ref:>14.3f} {ref * flops / 1e9:>10.1f} {'-':>8} {1.0:>8.2f}")
    for n, mode, rate in rows:
        base = next((r for m, md, r in rows  # the loop baseline of the same size and formulation
                     if m == n and md.partition("/")[0] == "loop" and md.partition("/")[2] == mode.partition("/")[2]),
                    None)
        vs_loop = f"{rate / base:>8.2f}" if base else f"{'-':>8}"
        vs_ref = f"{rate / ref:>8.2f}" if ref else f"{'-':>8}"
        print(f"{n:>8} {mode:>16} {rate:>14.3f} {rate * flops / 1e9:>10.1f} {vs_loop} {vs_ref}")
    if ref:
        print(f"(reference: mean of {len(refs)} measurements in this run, {', '.join(f'{r:.2f}' for r in refs)} "
              "steps/s; the PyTorch step is timed with the config's batch, float32)")


if __name__ == "__main__":
    main()
