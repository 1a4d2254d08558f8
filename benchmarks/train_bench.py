"""Training throughput: stacked members (one jitted scan+vmap call) vs a Python loop over members.

Prints model-steps/s and achieved FLOP/s (XLA's cost analysis of one member's training step) for
each stack size, and the speed-up over the loop baseline measured in the same run.

    python benchmarks/train_bench.py                       # reference 2x2 U-Net, 1/4/16 members
    python benchmarks/train_bench.py --preset vec2x2 --members 64
    python benchmarks/train_bench.py --strategy vmap,unroll          # CPU: grouped convs vs unrolled
    python benchmarks/train_bench.py --strategy vmap,map --dtype bfloat16   # on an accelerator
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxconcept import config as C, diffusion, sweep


def _time_advance(sw, state, data, k, reps):
    state, loss = sweep.advance(sw, state, data, k)  # compile + warm-up
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(reps):
        state, loss = sweep.advance(sw, state, data, k)
    jax.block_until_ready(loss)
    return (time.perf_counter() - t0) / (reps * k)  # seconds per step of the whole stack


def bench(cfg: C.Config, n_members: int, k: int, reps: int, loop: bool):
    seeds = list(range(n_members))
    cfg = C.override(cfg, [f"seeds={seeds}", f"train.steps_per_call={k}", "data.n_per_class=256"])
    if loop:  # baseline: one compiled single-member advance, called once per member in Python
        single = C.members(cfg)[0]
        sw = sweep.build(single, jax.devices()[:1])
        states = [sweep.init(sw, [m]) for m in C.members(cfg)]
        states[0] = (sweep.advance(sw, *states[0], k)[0], states[0][1])  # compile + warm-up (donates)
        jax.block_until_ready(states)  # init and warm-up are dispatched asynchronously: not timed
        t0 = time.perf_counter()
        for _ in range(reps):
            outs = [sweep.advance(sw, s, d, k) for s, d in states]
            states = [(o[0], d) for o, (_, d) in zip(outs, states)]
        jax.block_until_ready([o[1] for o in outs])
        return n_members * reps * k / (time.perf_counter() - t0)
    sw = sweep.build(cfg)
    state, data = jax.block_until_ready(sweep.init(sw))
    return n_members / _time_advance(sw, state, data, k, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2x2")
    ap.add_argument("--members", default="1,4,16", help="comma-separated stack sizes")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed call (lax.scan length)")
    ap.add_argument("--reps", type=int, default=2, help="timed calls")
    ap.add_argument("--strategy", default="vmap", help="comma-separated: vmap, map, unroll")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-loop", action="store_true", help="skip the Python-loop baseline")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args()
    strategies = a.strategy.split(",")
    cfg = C.override(C.preset(a.preset), [f"model.dtype=\"{a.dtype}\"", *a.sets])
    flops = diffusion.train_step_flops(cfg)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{len(jax.devices())} ({jax.default_backend()}); preset {a.preset}, "
          f"batch {cfg.train.batch_size}, {a.dtype}; {flops / 1e9:.2f} GFLOP per model-step (XLA)")
    print(f"{'members':>8} {'mode':>12} {'model-steps/s':>14} {'GFLOP/s':>10} {'vs loop':>8}")
    for n in [int(x) for x in a.members.split(",")]:
        base = None if a.no_loop else bench(cfg, n, a.steps, a.reps, loop=True)
        if base is not None:
            print(f"{n:>8} {'loop':>12} {base:>14.3f} {base * flops / 1e9:>10.1f} {1.0:>8.2f}", flush=True)
        for st in strategies:
            rate = bench(C.override(cfg, [f"train.strategy=\"{st}\""]), n, a.steps, a.reps, loop=False)
            ratio = f"{rate / base:>8.2f}" if base else f"{'-':>8}"
            print(f"{n:>8} {'stack-' + st:>12} {rate:>14.3f} {rate * flops / 1e9:>10.1f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
