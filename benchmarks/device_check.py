"""What one accelerator does with the reference U-Net, measured in one short run.

Run it on whatever device JAX sees (a GPU, a TPU chip, or the CPU); it stays within a time
budget, compiles included, by checking the clock before every measurement and skipping (and
naming) what no longer fits:

    python benchmarks/device_check.py --budget-s 240 --out runs/device_check
    python benchmarks/device_check.py --reference /tmp/reference     # + the PyTorch reference
    python benchmarks/device_check.py --tiny --out /tmp/dc           # seconds, on a CPU

It measures, in this order, and prints a table and writes DIR/device_check.json (rewritten
after every stage, so a run stopped from outside keeps what it had):

1. the device's ceiling: a large matrix product's TFLOP/s (bf16 on accelerators, float32 on a
   CPU), the denominator of every MFU below;
2. FLOPs of one member's training step (``diffusion.train_step_flops``: XLA's cost analysis);
3. the reference's own PyTorch training step (``--reference PATH``, when torch imports): one
   model, float32, its AdamW and gradient clipping, on the same device;
4. the stacked training step for every (dtype, members, stacking) asked for: ``vmap`` over the
   members, or ``map`` (``lax.map`` over chunks of ``--map-chunk`` vmapped members):
   model-steps/s, TFLOP/s, MFU, peak device memory, compile seconds;
5. the sampler (50 steps, 4 classes x 32 samples per member) for the largest stack trained;
6. Stable Diffusion 1.x (``benchmarks/sd_bench.py``): full-size SD-1.x shapes with random
   weights, 512 px, 4 images per call, the 50-step DDIM sampler with guidance and the VAE
   decoder per dtype: guided UNet steps/s, images/s, TFLOP/s, MFU (``--tiny``: the test
   fixture's tiny model at 32 px, 2 steps).

Only the engine's public API is used for training (``plan.build``, ``stack.init``,
``stack.advance``, ``stack.steps_per_call``); the compiled step is read through the sweep's
jitted ``advance`` (``sw.fns``), whose AOT compile the call then reuses.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

SCHEMA = 1
GIB = 2 ** 30


# --------------------------------------------------------------------------------------------
# Budget and output
# --------------------------------------------------------------------------------------------
class Clock:
    """Seconds since the start against the budget; ``fits(s)`` says whether s more still fit."""

    def __init__(self, budget_s: float, reserve_s: float):
        self.t0, self.budget, self.reserve = time.perf_counter(), budget_s, reserve_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left() - self.reserve


class Report:
    """The JSON record, written whole (temporary file, rename) after every stage."""

    def __init__(self, out_dir: Path, clock: Clock, head: dict):
        self.path = Path(out_dir) / "device_check.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.data = {"schema": SCHEMA, **head, "ceiling": None, "flops_per_model_step": None, "reference": None,
                     "train": [], "sampler": None, "sd": [], "skipped": [], "errors": [], "complete": False}

    def skip(self, what: str, why: str):
        self.data["skipped"].append({"what": what, "why": why})
        print(f"  skipped {what}: {why}", flush=True)

    def error(self, what: str, exc: BaseException):
        msg = f"{type(exc).__name__}: {exc}".strip()
        self.data["errors"].append({"what": what, "error": msg[:2000]})
        print(f"  FAILED {what}: {msg.splitlines()[0][:300] if msg else ''}", flush=True)

    def write(self):
        self.data["elapsed_s"] = round(self.clock.elapsed(), 3)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False, default=_jsonable) + "\n")
        os.replace(tmp, self.path)


def _jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _finite(v):
    """A JSON-safe number: None for missing, NaN or infinite values."""
    return None if v is None or not math.isfinite(v) else float(v)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def _timed_loop(call, min_time: float, clock: Clock, min_calls: int = 2, max_calls: int = 10_000):
    """Run ``call()`` (which blocks) at least ``min_calls`` times and until ``min_time`` has
    passed (or the budget is nearly spent); returns (calls, seconds)."""
    n, t0 = 0, time.perf_counter()
    while n < max_calls:
        call()
        n += 1
        dt = time.perf_counter() - t0
        if n >= min_calls and (dt >= min_time or not clock.fits(dt / n)):
            break
    return n, time.perf_counter() - t0


def matmul_ceiling(dtype_name: str, n: int, reps: int, min_time: float, clock: Clock, device) -> dict:
    """TFLOP/s of ``reps`` chained n x n x n products in one jitted call (dispatch amortised)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    scale = 1.0 / math.sqrt(n)  # keeps the chained product's entries O(1)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)

    def chain(a, b):
        return jax.lax.fori_loop(0, reps, lambda i, x: (x @ b) * jnp.asarray(scale, dtype), a)

    t = time.perf_counter()
    f = jax.jit(chain).lower(a, b).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(f(a, b))  # warm-up
    calls, dt = _timed_loop(lambda: jax.block_until_ready(f(a, b)), min_time, clock)
    flops = 2.0 * n ** 3 * reps * calls
    return {"dtype": dtype_name, "n": n, "tflops": flops / dt / 1e12, "seconds_per_matmul": dt / (calls * reps),
            "compile_s": compile_s}


def _peak_bytes(device):
    """The device allocator's running peak (bytes), or None where the backend has no stats."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return stats.get("peak_bytes_in_use") if stats else None


def _compiled_bytes(compiled):
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def train_config(base, members: int, strategy: str, chunk: int, dtype: str, k: int, n_per_class: int):
    from jaxconcept import config as C

    return C.override(base, [f"seeds={list(range(members))}", f'model.dtype="{dtype}"', f'train.strategy="{strategy}"',
                             f"train.map_batch_size={chunk}", f"train.steps_per_call={k}",
                             f"data.n_per_class={n_per_class}"])


def init_stack(cfg, devices):
    """Stacked train state and datasets of ``cfg`` (``stack.init``), and the seconds it took. The
    state does not depend on the compute dtype or the stacking, so one serves every
    configuration of a stack size (each gets a copy: ``advance`` donates its state)."""
    import jax

    from jaxconcept import plan, stack

    t = time.perf_counter()
    state, data = jax.block_until_ready(stack.init(plan.build(cfg, devices)))
    return state, data, time.perf_counter() - t


def measure_train(cfg, devices, state, data, min_time: float, clock: Clock) -> dict:
    """One stacked configuration: compile, warm up, then time whole ``stack.advance`` calls.

    ``state`` (donated) and ``data`` come from ``init_stack`` of a config with the same members."""
    import jax
    import jax.numpy as jnp

    from jaxconcept import plan, stack

    device = devices[0]
    out = {}
    peak_before = _peak_bytes(device)
    sw = plan.build(cfg, devices)
    k = stack.steps_per_call(sw)
    out["steps_per_call"] = k
    compiled = None
    t = time.perf_counter()
    try:  # compile ahead of time to read XLA's memory analysis; the call below reuses it
        compiled = sw.fns[1](k).lower(state, data, None).compile()
    except Exception as exc:  # noqa: BLE001 - an engine whose advance has another signature
        out["aot_note"] = f"ahead-of-time compile unavailable ({type(exc).__name__}); compile_s from the first call"
    aot_s = time.perf_counter() - t
    out["compiled_bytes"] = _compiled_bytes(compiled) if compiled is not None else None
    holder = {"state": state}
    del state

    def call():
        holder["state"], loss = stack.advance(sw, holder["state"], data, k)
        jax.block_until_ready(loss)
        holder["loss"] = loss

    t = time.perf_counter()
    call()  # warm-up (and the compile, when not done ahead of time)
    first_s = time.perf_counter() - t
    calls, dt = _timed_loop(call, min_time, clock)
    call_s = dt / calls
    out["compile_s"] = aot_s if compiled is not None else max(first_s - call_s, 0.0)
    out["first_call_s"] = first_s
    out["calls"], out["seconds"] = calls, dt
    out["step_s"] = call_s / k  # one step of the whole stack
    out["model_steps_per_s"] = len(sw.members) * k * calls / dt
    out["loss_finite"] = bool(np.isfinite(np.asarray(jax.device_get(holder["loss"]))).all())
    peak_after = _peak_bytes(device)
    out["peak_bytes_in_use"] = peak_after
    out["new_peak"] = None if peak_after is None else bool(peak_before is None or peak_after > peak_before)
    out["strategy_resolved"] = sw.strategy
    holder.clear()  # the donated state's successor: freed on return
    return out


def measure_sampler(cfg, devices, strategy: str, chunk: int, n_steps: int, per_class: int, min_time: float,
                    clock: Clock) -> dict:
    """Time of the ancestral sampler (``diffusion.sample``) for every member of a stack at once,
    ``per_class`` samples of every class per member, mapped over stacked parameters as the
    training step was (``vmap`` or ``lax.map`` in chunks)."""
    import jax

    from jaxconcept import data as D, diffusion, plan

    sw = plan.build(cfg, devices)
    spec, net, model = sw.spec, sw.net, cfg.model
    m, n = len(sw.members), spec.n_classes * per_class
    keys = jax.random.split(jax.random.PRNGKey(0), m)
    params = jax.jit(jax.vmap(lambda k: diffusion.init_params(net, model, spec, k)))(keys)
    prompts = jax.random.uniform(jax.random.PRNGKey(1), (m, n, spec.cond_dim))  # timing does not depend on them
    apply_fn = diffusion.make_apply(net)

    def one(p, c, k):
        return diffusion.sample(apply_fn, model, p, c, k, x_shape=spec.x_shape, n_steps=n_steps,
                                w_cfg=cfg.eval.w_cfg, null_cond=D.null_cond(spec), loop_safe=sw.loop_safe)

    def stacked(p, c, k):
        if strategy == "map":
            return jax.lax.map(lambda a: one(*a), (p, c, k), batch_size=chunk)
        return jax.vmap(one)(p, c, k)

    t = time.perf_counter()
    f = jax.jit(stacked).lower(params, prompts, keys).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(f(params, prompts, keys))
    calls, dt = _timed_loop(lambda: jax.block_until_ready(f(params, prompts, keys)), min_time, clock)
    call_s = dt / calls
    return {"members": m, "dtype": model.dtype, "strategy": strategy, "chunk": chunk if strategy == "map" else None,
            "n_steps": n_steps, "samples_per_member": n, "compile_s": compile_s, "calls": calls,
            "seconds_per_call": call_s, "seconds_per_member": call_s / m, "samples_per_s": m * n / call_s}


def measure_reference(reference: str, cfg, min_time: float, cpu_threads: bool = False) -> dict:
    """The reference's PyTorch training step, one model in float32, on this device.

    ``cpu_threads``: also time it with one intra-op thread and keep the faster (on a busy
    CPU, PyTorch's spinning worker threads can be many times slower than one thread)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference_torch as R

    from jaxconcept import data as D

    spec = D.spec(cfg.data)
    model = R.build_unet(reference, cfg.model, spec.x_shape[0], spec.cond_dim)
    h, w, c = spec.x_shape

    def rate():
        return R.train_rate(model, (c, h, w), spec.cond_dim, cfg.train.batch_size, lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay, clip=cfg.train.grad_clip, min_time=min_time)

    out = rate()
    if cpu_threads:
        import torch

        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
            try:
                one = rate()
            finally:
                torch.set_num_threads(threads)
            out["by_threads"] = {str(threads): out["steps_per_s"], "1": one["steps_per_s"]}
            if one["steps_per_s"] > out["steps_per_s"]:
                out = {**one, "by_threads": out["by_threads"]}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["device_name"] = torch.cuda.get_device_name(0)
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
            del model
            torch.cuda.empty_cache()  # hand the cached blocks back before JAX's big stacks
    except Exception:  # noqa: BLE001, S110 - these extras are optional; the rate is measured
        pass
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget, compiles included")
    ap.add_argument("--out", default="runs/device_check", help="directory for device_check.json")
    ap.add_argument("--tiny", action="store_true", help="preset 'tiny', small members: seconds on a CPU")
    ap.add_argument("--preset", default=None, help="default 2x2 (tiny with --tiny)")
    ap.add_argument("--members", default=None, help="comma-separated stack sizes (default 1,8,32; tiny 1,2)")
    ap.add_argument("--strategies", default="vmap,map", help="comma-separated: vmap, map (lax.map over chunks)")
    ap.add_argument("--map-chunk", type=int, default=1, help="members per lax.map chunk (train.map_batch_size)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="compute dtypes (model.dtype), in order")
    ap.add_argument("--steps-per-call", type=int, default=10,
                    help="lax.scan length per call on accelerators (conv nets on a CPU take 1)")
    ap.add_argument("--measure-s", type=float, default=None, help="timed seconds per measurement (3; tiny 0.2)")
    ap.add_argument("--n-per-class", type=int, default=None, help="training images per class (256; tiny preset's)")
    ap.add_argument("--sampler-steps", type=int, default=None, help="sampler steps (50; tiny 4)")
    ap.add_argument("--sampler-per-class", type=int, default=None, help="samples per class per member (32; tiny 4)")
    ap.add_argument("--no-sampler", action="store_true")
    ap.add_argument("--no-sd", action="store_true", help="skip the Stable Diffusion stage")
    ap.add_argument("--sd-size", type=int, default=None, help="SD image size in pixels (512; tiny 32)")
    ap.add_argument("--sd-batch", type=int, default=None, help="SD images per sampler call (4; tiny 1)")
    ap.add_argument("--sd-steps", type=int, default=None, help="SD DDIM steps (50; tiny 2)")
    ap.add_argument("--reference", default=None, help="a checkout of the reference, for its PyTorch step")
    ap.add_argument("--matmul-n", type=int, default=None, help="ceiling matrix size (8192 on accelerators)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config overrides KEY=VALUE")
    a = ap.parse_args(argv)
    a.preset = a.preset or ("tiny" if a.tiny else "2x2")
    a.members = [int(x) for x in (a.members or ("1,2" if a.tiny else "1,8,32")).split(",") if x]
    a.strategies = [s for s in a.strategies.split(",") if s]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.measure_s = a.measure_s if a.measure_s is not None else (0.2 if a.tiny else 3.0)
    a.sampler_steps = a.sampler_steps or (4 if a.tiny else 50)
    a.sampler_per_class = a.sampler_per_class or (4 if a.tiny else 32)
    a.sd_size, a.sd_batch = a.sd_size or (32 if a.tiny else 512), a.sd_batch or (1 if a.tiny else 4)
    a.sd_steps = a.sd_steps or (2 if a.tiny else 50)
    for s in a.strategies:
        if s not in ("vmap", "map", "unroll", "auto"):
            ap.error(f"--strategies: {s!r} is not one of vmap, map, unroll, auto")
    for d in a.dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtypes: {d!r} is not one of float32, bfloat16")
    if not a.members or min(a.members) < 1:
        ap.error("--members: positive integers")
    return a


def plan(a) -> list[tuple]:
    """(dtype, members, strategy) in measurement order: every stack size of the first dtype,
    then the next; one member is measured once (every stacking is the same for it)."""
    out = []
    for dtype in a.dtypes:
        for m in a.members:
            for s in (a.strategies[:1] if m == 1 else a.strategies):
                out.append((dtype, m, s))
    return out


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


class Check:
    """The stages of one run, sharing the clock, the report and what earlier stages measured."""

    def __init__(self, a):
        import jax

        from jaxconcept import config as C

        self.a, self.jax = a, jax
        self.clock = Clock(a.budget_s, reserve_s=1.0 if a.tiny else 5.0)
        self.backend = jax.default_backend()
        self.accel = self.backend != "cpu"
        self.devices = jax.devices()[:1]  # figures are per chip: one device against its own ceiling
        self.base = C.override(C.preset(a.preset), list(a.sets))
        self.n_per_class = a.n_per_class or (self.base.data.n_per_class if a.tiny else 256)
        self.ceiling = self.flops = self.ref_rate = None
        self.compile_seen = []
        dev = self.devices[0]
        head = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(a.argv), "budget_s": a.budget_s,
            "device": {"backend": self.backend, "kind": dev.device_kind, "count": len(jax.devices()), "used": 1,
                       "jax": jax.__version__, "python": platform.python_version(), "host": platform.machine(),
                       "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
            "preset": a.preset, "batch_size": self.base.train.batch_size, "n_per_class": self.n_per_class,
            "members": a.members, "strategies": a.strategies, "map_chunk": a.map_chunk, "dtypes": a.dtypes,
        }
        self.rep = Report(a.out, self.clock, head)
        print(f"device_check: {dev.device_kind} ({self.backend}, {len(jax.devices())} device(s), 1 used), jax "
              f"{jax.__version__}; preset {a.preset}, batch {self.base.train.batch_size}; budget {a.budget_s:.0f} s",
              flush=True)
        self.rep.write()

    def rates(self, model_steps_per_s: float):
        """(TFLOP/s, MFU against the measured ceiling) of a rate in model-steps/s."""
        if self.flops is None:
            return None, None
        tf = model_steps_per_s * self.flops / 1e12
        return tf, (_finite(tf / self.ceiling) if self.ceiling else None)

    def ceiling_stage(self):
        a, rep = self.a, self.rep
        dtype = "bfloat16" if self.accel else "float32"
        n = a.matmul_n or (8192 if self.accel else (256 if a.tiny else 1024))
        reps, t = (10 if self.accel else 4), min(1.0, a.measure_s)
        if not self.clock.fits(t + 1):
            return rep.skip("ceiling", f"{self.clock.left():.1f} s left")
        try:
            c = matmul_ceiling(dtype, n, reps, t, self.clock, self.devices[0])
            if self.accel and "float32" in a.dtypes and self.clock.fits(10):
                c["float32_tflops"] = matmul_ceiling("float32", n, reps, t, self.clock, self.devices[0])["tflops"]
        except Exception as exc:  # noqa: BLE001 - report and go on: the rest is still worth having
            return rep.error("ceiling", exc)
        rep.data["ceiling"], self.ceiling = c, c["tflops"]
        print(f"ceiling: {dtype} {n}x{n} matmul {c['tflops']:.3f} TFLOP/s"
              + (f"; float32 (default precision) {c['float32_tflops']:.3f}" if "float32_tflops" in c else ""),
              flush=True)

    def flops_stage(self):
        from jaxconcept import diffusion

        if not self.clock.fits(1):
            return self.rep.skip("flops", f"{self.clock.left():.1f} s left")
        t = time.perf_counter()
        try:
            self.flops = _finite(diffusion.train_step_flops(self.base))
        except Exception as exc:  # noqa: BLE001
            return self.rep.error("flops", exc)
        self.rep.data["flops_per_model_step"] = self.flops
        self.rep.data["flops_compile_s"] = time.perf_counter() - t
        self.compile_seen.append(time.perf_counter() - t)
        print(f"one member's training step: {_fmt(self.flops and self.flops / 1e9, '.3f')} GFLOP (XLA cost "
              f"analysis, batch {self.base.train.batch_size})", flush=True)

    def reference_stage(self):
        a, rep = self.a, self.rep
        if not a.reference:
            return
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import reference_torch as R

            why = R.available()
        except Exception as exc:  # noqa: BLE001
            why = f"{type(exc).__name__}: {exc}"
        if why:
            return rep.skip("reference", why)
        if not self.clock.fits(3 * a.measure_s + (20 if self.accel else 2)):
            return rep.skip("reference", f"{self.clock.left():.0f} s left")
        try:
            r = measure_reference(a.reference, self.base, a.measure_s, cpu_threads=not self.accel)
        except Exception as exc:  # noqa: BLE001
            return rep.error("reference", exc)
        r["tflops"], r["mfu"] = self.rates(r["steps_per_s"])
        rep.data["reference"], self.ref_rate = r, r["steps_per_s"]
        print(f"reference (PyTorch {r.get('torch', '?')}, {r['device']}, float32, 1 model): "
              f"{r['steps_per_s']:.3f} steps/s, {_fmt(r['tflops'], '.3f')} TFLOP/s", flush=True)

    def train_stage(self):
        from jaxconcept import nets

        a, rep, clock = self.a, self.rep, self.clock
        hdr = (f"{'dtype':>8} {'members':>7} {'stacking':>9} {'steps/call':>10} {'model-steps/s':>13} "
               f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'XLA GiB':>8} {'compile s':>9} {'vs ref':>7}")
        print(hdr + "\n" + "-" * len(hdr), flush=True)
        init_seen, per_model_step = [], {}
        stacks = {}  # members -> (state, data): one init per stack size
        for dtype, m, strategy in plan(a):
            label = f"train {dtype} members={m} {strategy}"
            chunk = min(a.map_chunk, m)
            cfg = train_config(self.base, m, strategy, chunk, dtype, a.steps_per_call, self.n_per_class)
            k = a.steps_per_call if nets.loop_safe(cfg.model) else 1
            sec = per_model_step.get(dtype) or (min(per_model_step.values()) if per_model_step else None)
            est = ((1.2 * max(self.compile_seen) if self.compile_seen else 0.0)
                   + (max(init_seen) if init_seen and m not in stacks else 0.0)
                   + (3 * m * k * sec if sec else 0.0) + a.measure_s)
            if not clock.fits(est):
                rep.skip(label, f"needs about {est:.0f} s, {clock.left():.0f} s left")
                rep.write()
                continue
            row = {"dtype": dtype, "members": m, "strategy": strategy, "chunk": chunk if strategy == "map" else None,
                   "status": "ok"}
            t = time.perf_counter()
            try:
                if m not in stacks:
                    stacks.clear()  # one stack size in memory at a time
                    gc.collect()
                    state, data, row["init_s"] = init_stack(cfg, self.devices)
                    stacks[m] = (state, data)
                    init_seen.append(row["init_s"])
                state, data = stacks[m]
                row.update(measure_train(cfg, self.devices, self.jax.tree.map(lambda x: x.copy(), state), data,
                                         a.measure_s, clock))
            except Exception as exc:  # noqa: BLE001 - out of memory, or a backend limit: record and go on
                row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000], wall_s=time.perf_counter() - t)
                rep.data["train"].append(row)
                rep.error(label, exc)
                rep.write()
                gc.collect()
                continue
            row["wall_s"] = time.perf_counter() - t
            self.compile_seen.append(row["compile_s"])
            per_model_step[dtype] = 1.0 / row["model_steps_per_s"]
            row["tflops"], row["mfu"] = self.rates(row["model_steps_per_s"])
            row["vs_reference"] = row["model_steps_per_s"] / self.ref_rate if self.ref_rate else None
            rep.data["train"].append(row)
            rep.write()
            peak = row["peak_bytes_in_use"]
            peak_s = "-" if peak is None else ("" if row["new_peak"] else "<=") + f"{peak / GIB:.2f}"
            xla = _fmt(row["compiled_bytes"] and row["compiled_bytes"] / GIB, ".2f")
            stk = strategy + (f"/{chunk}" if strategy == "map" else "")
            print(f"{dtype:>8} {m:>7} {stk:>9} {row['steps_per_call']:>10} {row['model_steps_per_s']:>13.3f} "
                  f"{_fmt(row['tflops'], '.3f'):>8} {_fmt(row['mfu'], '.1%'):>6} {peak_s:>9} {xla:>8} "
                  f"{row['compile_s']:>9.1f} {_fmt(row['vs_reference'], '.2f'):>7}", flush=True)
        stacks.clear()
        gc.collect()

    def sampler_stage(self):
        """The sampler for the largest stack of the first dtype that trained, stacked as the
        fastest training configuration of that size was."""
        a, rep = self.a, self.rep
        ok = [r for r in rep.data["train"] if r["status"] == "ok" and r["dtype"] == a.dtypes[0]]
        if a.no_sampler:
            return rep.skip("sampler", "--no-sampler")
        if not ok:
            return rep.skip("sampler", "no training configuration of the first dtype ran")
        m = max(r["members"] for r in ok)
        best = max((r for r in ok if r["members"] == m), key=lambda r: r["model_steps_per_s"])
        chunk = best["chunk"] or 1
        cfg = train_config(self.base, m, best["strategy"], chunk, a.dtypes[0], a.steps_per_call, self.n_per_class)
        est = (1.2 * max(self.compile_seen) if self.compile_seen else 0.0) + 3 * a.measure_s
        if not self.clock.fits(est):
            return rep.skip("sampler", f"needs about {est:.0f} s, {self.clock.left():.0f} s left")
        try:
            s = measure_sampler(cfg, self.devices, best["strategy"], chunk, a.sampler_steps, a.sampler_per_class,
                                a.measure_s, self.clock)
        except Exception as exc:  # noqa: BLE001
            return rep.error("sampler", exc)
        if self.flops is not None:  # a forward pass costs about a third of a training step per image
            s["tflops_est"] = s["samples_per_s"] * s["n_steps"] * self.flops / self.base.train.batch_size / 3 / 1e12
            s["mfu_est"] = _finite(s["tflops_est"] / self.ceiling) if self.ceiling else None
        rep.data["sampler"] = s
        print(f"sampler: {s['n_steps']} steps, {s['samples_per_member']} samples per member, {m} members "
              f"({s['strategy']}, {s['dtype']}): {s['seconds_per_member']:.3f} s per member, "
              f"{s['samples_per_s']:.0f} samples/s (compile {s['compile_s']:.1f} s)", flush=True)

    def sd_stage(self):
        """Stable Diffusion 1.x sampling and decoding per dtype (``sd_bench.measure``)."""
        a, rep = self.a, self.rep
        if a.no_sd:
            return rep.skip("sd", "--no-sd")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import sd_bench

        from jaxconcept.sd import configs

        cfg = configs.from_folder(sd_bench.TINY) if a.tiny else configs.SDConfig()
        seen = []
        for dtype in a.dtypes:
            est = (1.2 * max(seen) if seen else (20.0 if a.tiny else 150.0)) + 4 * a.measure_s
            if not self.clock.fits(est):
                rep.skip(f"sd {dtype}", f"needs about {est:.0f} s, {self.clock.left():.0f} s left")
                continue
            try:
                row = sd_bench.measure(cfg, dtype, a.sd_size, a.sd_batch, a.sd_steps, a.measure_s, self.clock.fits)
            except Exception as exc:  # noqa: BLE001 - out of memory, or a backend limit: record and go on
                rep.error(f"sd {dtype}", exc)
                continue
            row["model"] = "tiny (tests/fixtures/sd_tiny)" if a.tiny else "SD-1.x full size, random weights"
            row["mfu"] = _finite(row["tflops"] / self.ceiling) if self.ceiling else None
            rep.data["sd"].append(row)
            rep.write()
            seen.append(row["init_s"] + row["sample_compile_s"] + row["decode_compile_s"])
            print(f"sd {dtype}: {row['batch']} x {row['size']} px, {row['n_steps']} steps: "
                  f"{row['guided_steps_per_s']:.2f} guided steps/s, {row['images_per_s']:.3f} images/s, "
                  f"{row['tflops']:.2f} TFLOP/s (MFU {_fmt(row['mfu'], '.1%')}); compile "
                  f"{row['sample_compile_s']:.0f} + {row['decode_compile_s']:.0f} s", flush=True)

    def run(self) -> dict:
        for stage in (self.ceiling_stage, self.flops_stage, self.reference_stage, self.train_stage,
                      self.sampler_stage, self.sd_stage):
            stage()
            self.rep.write()
        self.rep.data["complete"] = True
        self.rep.write()
        print(f"wrote {self.rep.path} ({self.clock.elapsed():.1f} s of {self.a.budget_s:.0f})", flush=True)
        return self.rep.data


def main(argv=None) -> dict:
    """Run the check; returns what was written to DIR/device_check.json."""
    a = parse(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if a.tiny and "jax" not in sys.modules and "optimization_level" not in flags:
        # the tiny networks compile longer than they run: XLA's backend optimisations off
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    return Check(a).run()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:  # noqa: BLE001 - the JSON written so far stays; say what broke
        traceback.print_exc()
        sys.exit(1)
