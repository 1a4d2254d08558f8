"""How big and how many the programs of a run are, measured on a CPU any day (no GPU needed).

    python benchmarks/compile_bench.py                    # all three measures (~10 min on 2 cores)
    python benchmarks/compile_bench.py --no-cpu-compile   # op counts and compile counts only

1. **Ops**: init, the training step (``advance``) and ``evaluate`` of a preset (default the
   reference 2x2 U-Net as benchmarks/device_check.sh runs it: bfloat16, vmap, 10 steps per call)
   are lowered *for CUDA* on this machine (``lowering_platforms=("cuda",)``) and their StableHLO
   ops counted with every ``func.call`` inlined (each call counts its callee's ops again): what
   XLA:GPU compiles.
2. **CPU compile seconds** of the same three programs lowered for this CPU: one after another,
   and side by side as training compiles them (``programs.compile_programs``).
3. **Programs compiled before a run's first metric**: ``jaxconcept train`` of a run shaped like
   experiments/colour_sweep_mini.json (8 members swept over sep_col, 30 evaluation points, 100
   steps per call; the first point at step 20, between multiples of 100), shrunk to the tiny
   U-Net, in a fresh process with an empty persistent
   compilation cache, stopped after its first metrics record; then the same in a second fresh
   process on the warm cache. Counted from JAX's own monitoring events: backend compile
   requests, and persistent-cache misses (an XLA compile) and hits.

Each figure is printed beside the one measured on main 5c03fd6 before the programs were cut
down (issue 32) and the target.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEFORE = {"init": 91_300, "advance": 39_700, "evaluate": 14_500, "compiles": 195}  # main 5c03fd6 (issue 32)
TARGET = {"init": 20_000, "advance": 22_000, "evaluate": 9_000, "compiles": 8, "warm": 0}
COUNT_SETS = [  # colour_sweep_mini's sweep and schedule on the tiny U-Net
    "data.sep_col=[0.2,0.286,0.371,0.457,0.543,0.629,0.714,0.8]", "seeds=[0]", "train.steps=16000",
    "train.steps_per_call=100", "train.checkpoint_every=2000", "eval.n_points=30", "eval.first=20",
    "eval.save_params=false"]


def inlined_ops(lowered) -> collections.Counter:
    """StableHLO ops of a lowered program, every ``func.call`` replaced by its callee's ops."""
    from jax._src.lib.mlir import ir

    module = lowered.compiler_ir("stablehlo")
    funcs = {ir.StringAttr(op.operation.attributes["sym_name"]).value: op.operation
             for op in module.body.operations if op.operation.name == "func.func"}

    @functools.cache
    def ops(name):
        c = collections.Counter()

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for o in block.operations:
                        o = o.operation
                        if o.name == "func.call":
                            c.update(ops(ir.FlatSymbolRefAttr(o.attributes["callee"]).value))
                        elif o.name != "func.return":
                            c[o.name] += 1
                        walk(o)
        walk(funcs[name])
        return c
    return ops("main")


def measure_ops(args) -> dict:
    from jaxconcept import config as C
    from jaxconcept.train import programs, stack

    cfg = C.resolve(args.preset, None, args.set)
    sw = stack.build(cfg, strategy=args.strategy)
    out = {}
    for name in ("init", "advance", "evaluate"):
        t0 = time.perf_counter()
        c = inlined_ops(programs.lower(sw, name, ("cuda",)))
        out[name] = {"ops": sum(c.values()), "top": c.most_common(4), "lower_s": time.perf_counter() - t0}
    return out


def measure_cpu_compile(args) -> dict:
    from jaxconcept import config as C
    from jaxconcept.train import programs, stack

    cfg = C.resolve(args.preset, None, args.set)
    sw = stack.build(cfg, strategy=args.strategy)
    out = {}
    for name in ("init", "advance", "evaluate"):
        low = programs.lower(sw, name)
        t0 = time.perf_counter()
        low.compile()
        out[name] = time.perf_counter() - t0
    sw = stack.build(cfg, strategy=args.strategy)  # a fresh sweep: nothing compiled yet
    t0 = time.perf_counter()
    sw.programs()
    out["side_by_side"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------
# Counting compiles: a child process runs `jaxconcept train` until its first metrics record
# ------------------------------------------------------------------------------------------
def child(run_dir: str, sets: list) -> None:
    """In a fresh process: train until the first metrics record, counting JAX's compile events."""
    import jax
    from jax._src import monitoring

    counts = collections.Counter()
    monitoring.register_event_listener(lambda event, **kw: counts.update([event]))
    monitoring.register_event_duration_secs_listener(lambda event, duration, **kw: counts.update([event]))

    from jaxconcept import cli, rundir

    real_append = rundir.append_metrics

    def first_metric(run, record):  # the first record is written: report and stop here
        real_append(run, record)
        print(json.dumps({"requests": counts["/jax/core/compile/backend_compile_duration"],
                          "misses": counts["/jax/compilation_cache/cache_misses"],
                          "hits": counts["/jax/compilation_cache/cache_hits"], "step": record["step"]}), flush=True)
        os._exit(0)
    rundir.append_metrics = first_metric
    jax.config.update("jax_log_compiles", False)
    cli.main(["train", "--preset", "tiny", *[a for s in sets for a in ("--set", s)], "--no-progress", "--out", run_dir])


def count_compiles(sets: list) -> list[dict]:
    """Two fresh processes, one after the other, on one new compilation cache: their counts."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(Path(tmp) / "xla"))
        for i in range(2):
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import compile_bench; "
                    f"compile_bench.child({str(Path(tmp) / f'run{i}')!r}, {sets!r})")
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                raise RuntimeError(f"the counting run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
            out.append({**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2x2")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help="overrides (default: model.dtype=bfloat16, train.steps_per_call=10)")
    ap.add_argument("--strategy", default="vmap")
    ap.add_argument("--no-cpu-compile", action="store_true", help="skip the CPU compile timing")
    ap.add_argument("--no-count", action="store_true", help="skip counting a run's compiles")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    args.set = args.set if args.set is not None else ['model.dtype="bfloat16"', "train.steps_per_call=10"]
    ok = True
    report = {"preset": args.preset, "set": args.set, "strategy": args.strategy}

    report["ops"] = ops = measure_ops(args)
    print(f"StableHLO ops lowered for CUDA, calls inlined ({args.preset}, {', '.join(args.set)}, {args.strategy}):")
    for name, r in ops.items():
        met = r["ops"] <= TARGET[name]
        ok &= met
        print(f"  {name:9s} {r['ops']:>7,d} ops (before {BEFORE[name]:,d}, target <= {TARGET[name]:,d}: "
              f"{'met' if met else 'NOT met'}); most: " + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in r["top"]))
    if not args.no_cpu_compile:
        report["cpu_compile_s"] = cc = measure_cpu_compile(args)
        print("CPU compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in cc.items() if k != "side_by_side")
              + f"; all three side by side {cc['side_by_side']:.1f}")
    if not args.no_count:
        report["compiles"] = runs = count_compiles(COUNT_SETS)
        cold, warm = runs
        print(f"programs compiled before the first metric (tiny U-Net, colour_sweep_mini's sweep, first record at "
              f"step {cold['step']}):")
        met_cold, met_warm = cold["misses"] <= TARGET["compiles"], warm["misses"] == 0
        ok &= met_cold and met_warm
        print(f"  fresh cache: {cold['misses']} compiled ({cold['requests']} requested; before {BEFORE['compiles']}, "
              f"target <= {TARGET['compiles']}: {'met' if met_cold else 'NOT met'}), {cold['wall_s']:.0f} s")
        print(f"  second process, same config: {warm['misses']} compiled, {warm['hits']} read from the cache "
              f"(target 0: {'met' if met_warm else 'NOT met'}), {warm['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("all targets met" if ok else "some targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
