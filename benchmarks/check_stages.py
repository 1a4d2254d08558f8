"""The stages of ``device_check.py`` (its docstring says what each measures) and the background
work they share: the compile farm (``stacking.Farm``) and the PyTorch peers' process."""
from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import check_report as CR
import stacking as S

GIB = 2 ** 30
HERE = Path(__file__).resolve().parent


def count_cache_events() -> collections.Counter:
    """Counts of JAX's persistent compilation cache hits and misses from now on (its monitoring
    events), as a Counter that fills itself."""
    from jax._src import monitoring

    counts = collections.Counter()
    names = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}

    def listen(event, **kw):
        if event in names:
            counts[names[event]] += 1
    monitoring.register_event_listener(listen)
    return counts


def _timed(call, min_time: float, fits, min_calls: int = 2) -> tuple[int, float]:
    """Run ``call()`` (blocking) at least ``min_calls`` times and until ``min_time`` has passed or
    ``fits(seconds)`` says one more call would not fit; returns (calls, seconds)."""
    n, t0 = 0, time.perf_counter()
    while True:
        call()
        n += 1
        dt = time.perf_counter() - t0
        if n >= min_calls and (dt >= min_time or not fits(dt / n)):
            return n, dt


def matmul_ceiling(dtype_name: str, n: int, reps: int, min_time: float, device) -> dict:
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
    jax.block_until_ready(f(a, b))
    calls, dt = _timed(lambda: jax.block_until_ready(f(a, b)), min_time, lambda s: True)
    return {"dtype": dtype_name, "n": n, "tflops": 2.0 * n ** 3 * reps * calls / dt / 1e12,
            "seconds_per_matmul": dt / (calls * reps), "compile_s": compile_s}


class TorchPeers:
    """``torch_ensemble.py --wait-go`` in its own process: it builds and compiles while this one
    compiles, and times only after ``go()``. Its ``@row`` lines are collected as they come."""

    def __init__(self, a, config_args, accel: bool):
        members = a.torch_members or ([m for m in (32, 8, 96) if m in a.members] or [max(a.members)])
        compile_ = a.torch_compile == "yes" or (a.torch_compile == "auto" and accel)
        cmd = [sys.executable, str(HERE / "torch_ensemble.py"), "--reference", a.reference, *config_args,
               "--members", ",".join(map(str, members)), "--dtype", "bfloat16", "--measure-s", str(a.measure_s),
               "--wait-go"] + ([] if compile_ else ["--no-compile"])
        self.members, self.rows, self.events, self.tail = members, [], queue.Queue(), collections.deque(maxlen=40)
        self.t0 = time.perf_counter()
        env = dict(os.environ) if accel else dict(os.environ, OMP_NUM_THREADS="1")  # a CPU: one thread
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        import json

        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("@"):
                tag, _, payload = line[1:].partition(" ")
                if tag == "row":
                    self.rows.append(json.loads(payload))
                self.events.put(tag)
            else:
                self.tail.append(line)
        self.events.put("exit")

    def wait_for(self, tag: str, deadline: float) -> bool:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            try:
                got = self.events.get(timeout=left)
            except queue.Empty:
                return False
            if got == tag:
                return True
            if got == "exit":
                return False

    def go(self):
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Stages:
    """Each stage is a method taking its deadline (a ``time.perf_counter`` value, or None for the
    short fixed stages); what they measure goes to ``check.rep``."""

    def __init__(self, check):
        self.c, self.a, self.rep, self.jax = check, check.a, check.rep, check.jax
        self.ceiling_tflops = self.flops_per_step = None
        self.farm = self.peers = None
        self.rows = []
        self.futures = {}  # name -> Future of (compiled, info)
        self.sweeps = {}  # row -> Stack
        self.state = None  # (state, data) of the run's members, once initialised

    # ---------------------------------------------------------------- helpers
    def rates(self, model_steps_per_s):
        if self.flops_per_step is None or model_steps_per_s is None:
            return None, None
        tf = model_steps_per_s * self.flops_per_step / 1e12
        return tf, (CR.finite(tf / self.ceiling_tflops) if self.ceiling_tflops else None)

    def fits_before(self, deadline):
        return lambda s: time.perf_counter() + s <= deadline

    # ---------------------------------------------------------------- 1. ceiling, 2. FLOPs
    def ceiling(self, _):
        a, c = self.a, self.c
        dtype = "bfloat16" if c.accel else "float32"
        n = a.matmul_n or (8192 if c.accel else (256 if a.tiny else 1024))
        if not c.budget.fits(2):
            return self.rep.skip("ceiling", f"{c.budget.left():.1f} s left")
        r = matmul_ceiling(dtype, n, 10 if c.accel else 4, min(1.0, a.measure_s), c.devices[0])
        if c.accel and "float32" in a.dtypes and c.budget.fits(10):
            r["float32_tflops"] = matmul_ceiling("float32", n, 10, min(1.0, a.measure_s), c.devices[0])["tflops"]
        self.rep.data["ceiling"], self.ceiling_tflops = r, r["tflops"]
        print(f"ceiling: {dtype} {n}x{n} matmul {r['tflops']:.3f} TFLOP/s"
              + (f"; float32 {r['float32_tflops']:.3f}" if "float32_tflops" in r else ""), flush=True)

    def flops(self, _):
        from jaxconcept import vdm

        if not self.c.budget.fits(1):
            return self.rep.skip("flops", f"{self.c.budget.left():.1f} s left")
        t = time.perf_counter()
        self.flops_per_step = CR.finite(vdm.train_step_flops(self.c.base))
        self.rep.data["flops_per_model_step"] = self.flops_per_step
        self.rep.data["flops_s"] = round(time.perf_counter() - t, 3)
        gflop = CR.fmt(self.flops_per_step and self.flops_per_step / 1e9, '.3f')
        print(f"one member's training step: {gflop} GFLOP (cost analysis of the lowered program, "
              f"{self.rep.data['flops_s']:.1f} s)", flush=True)

    # ---------------------------------------------------------------- background work
    def start_background(self):
        """Start the PyTorch peers' process, then submit every program to the compile farm in
        priority order: the run's init, the rows, the run's evaluate, Stable Diffusion."""
        from jaxconcept.train import programs

        a, c = self.a, self.c
        if a.reference and c.accel:  # on a CPU it would take the cores our compiles need: it starts at its stage
            self.start_peers()
        self.rows = S.plan_rows(a.members, a.dtypes, a.fp32_members, c.backend, a.map_chunks, c.run_members,
                                compare=not a.no_compare)
        if not c.budget.fits(1):
            return  # nothing to start: the stages skip, naming what
        self.farm = S.Farm(a.workers or os.cpu_count() or 2)
        run_row = next(r for r in self.rows if r.members == c.run_members) if c.run_members in a.members else \
            S.Row(a.dtypes[0], c.run_members, *S.stackings(c.run_members, c.backend)[0])
        self.run_sweep = S.row_sweep(c.base, run_row, c.devices)
        self.futures["init"] = self.farm.submit("init", lambda: programs.lower(self.run_sweep, "init"))
        for i, r in enumerate(self.rows):
            sw = self.sweeps[r] = S.row_sweep(c.base, r, c.devices)
            self.futures[r] = self.farm.submit(r.label, lambda sw=sw: programs.lower(sw, "advance"))
            if i == 0 and not a.no_sampler:  # the run's evaluate early: the run needs it too
                self.futures["evaluate"] = self.farm.submit("evaluate", lambda: programs.lower(self.run_sweep, "evaluate"))
        if not a.no_sd:
            import sd_bench

            for d in a.sd_dtypes:
                lowered = {}

                def lower(name, d=d, lowered=lowered):
                    if not lowered:
                        lowered.update(sd_bench.lowered(self.sd_config(), d, a.sd_size, a.sd_batch, a.sd_steps))
                    return lowered[name]
                for name in ("sample", "decode"):
                    self.futures[f"sd {d} {name}"] = self.farm.submit(f"sd {d} {name}", lambda n=name, f=lower: f(n))

    def start_peers(self):
        try:
            self.peers = TorchPeers(self.a, ["--config", self.a.config]
                                    + [w for s in self.a.all_sets for w in ("--set", s)], self.c.accel)
        except Exception as exc:  # noqa: BLE001
            self.rep.error("torch (start)", exc)

    def sd_config(self):
        import sd_bench

        from jaxconcept.sd import configs

        return configs.from_folder(sd_bench.TINY) if self.a.tiny else configs.SDConfig()

    def _wait(self, key, deadline):
        """(compiled, info) of a submitted program, or None when it was not submitted or its
        deadline passes first."""
        if key not in self.futures:
            return None
        try:
            return self.futures[key].result(timeout=max(0.0, deadline - time.perf_counter()))
        except concurrent.futures.TimeoutError:
            return None

    # ---------------------------------------------------------------- 3. stacked training
    def train(self, deadline):
        from check_train import train_stage

        train_stage(self, deadline)

    # ---------------------------------------------------------------- 4. the PyTorch peers
    def torch(self, deadline):
        if not self.a.reference:
            return self.rep.skip("torch", "no --reference (a checkout of the reference) given")
        if self.peers is None and not self.c.accel and self.c.budget.fits(1):
            self.start_peers()
        if self.peers is None:
            return self.rep.skip("torch", "its process did not start")
        p = self.peers
        one_row = 3 * self.a.measure_s + 3  # the reference's step at least; ensembles as time allows
        if not p.wait_for("ready", deadline - one_row):
            ended = p.proc.poll() is not None
            p.stop()
            self.rep.data["torch"] = p.rows  # what failed while building or compiling
            what = "it ended" if ended else f"not ready {time.perf_counter() - p.t0:.0f} s after it started"
            return self.rep.skip("torch", f"{what} (building and compiling); last output: "
                                          f"{' | '.join(list(p.tail)[-3:])[-600:]}")
        p.go()
        done = p.wait_for("done", deadline)
        p.stop()
        self.rep.data["torch"] = p.rows
        if not done:
            self.rep.skip("torch (the rest)", f"not done by its deadline; {len(p.rows)} row(s) came back")
        for r in p.rows:
            if r.get("status") == "ok":
                r["tflops"], r["mfu"] = self.rates(r["model_steps_per_s"])
            print(f"torch {r['what']} members={r['members']} {r.get('dtype')} compiled={r.get('compiled')}: "
                  + (f"{r['model_steps_per_s']:.3f} model-steps/s (warm-up {CR.fmt(r.get('warmup_s'), '.1f')} s)"
                     if r.get("status") == "ok" else f"FAILED {r.get('error', '')[:200]}"), flush=True)

    # ---------------------------------------------------------------- 5. the run's evaluation
    def sampler(self, deadline):
        import jax

        from jaxconcept.train import programs, stack

        if self.a.no_sampler:
            return self.rep.skip("sampler", "--no-sampler")
        if self.state is None:
            return self.rep.skip("sampler", "no initialised state (the train stage did not reach its init)")
        got = self._wait("evaluate", deadline - 3 * self.a.measure_s)
        if got is None:
            return self.rep.skip("sampler", "its program did not compile in time")
        compiled, info = got
        sw = self.run_sweep
        state, data = self.state
        ins = programs.abstract_inputs(sw)["evaluate"]
        prompts = jax.device_put(jax.random.uniform(jax.random.PRNGKey(1), ins[2].shape), sw.sharding())
        seeds = stack.put(sw, stack.seeds_array(sw))

        def call():
            jax.block_until_ready(compiled(state, data, prompts, seeds, stack.scalar(sw, 1)))
        t = time.perf_counter()
        call()
        first = time.perf_counter() - t
        calls, dt = _timed(call, self.a.measure_s, self.fits_before(deadline))
        ec, spec, m = sw.cfg.eval, sw.spec, sw.size
        n = spec.n_classes * ec.n_samples
        s = {"members": m, "dtype": sw.cfg.model.dtype, "strategy": sw.strategy, "sampler_steps": ec.sampler_steps,
             "samples_per_member": n, "lower_s": info["lower_s"], "compile_s": info["compile_s"], "first_call_s": first,
             "calls": calls, "seconds_per_call": dt / calls, "seconds_per_member": dt / calls / m,
             "samples_per_s": m * n * calls / dt, "includes": "the held-back validation and test losses"}
        self.rep.data["sampler"] = s
        print(f"evaluate (sampler {ec.sampler_steps} steps x {n} samples, + held-back losses) of {m} members: "
              f"{s['seconds_per_call']:.3f} s per call, {s['samples_per_s']:.0f} samples/s (compile "
              f"{info['compile_s']:.1f} s)", flush=True)

    # ---------------------------------------------------------------- 6. Stable Diffusion
    def sd(self, deadline):
        import sd_bench

        a = self.a
        if a.no_sd:
            return self.rep.skip("sd", "--no-sd")
        cfg, fits = self.sd_config(), self.fits_before(deadline)
        for d in a.sd_dtypes:
            if not (self._wait(f"sd {d} sample", deadline - 4 * a.measure_s)
                    and self._wait(f"sd {d} decode", deadline - 4 * a.measure_s)):
                self.rep.skip(f"sd {d}", "its programs did not compile before the stage's deadline")
                continue
            try:
                row = sd_bench.measure(cfg, d, a.sd_size, a.sd_batch, a.sd_steps, a.measure_s, fits)
            except Exception as exc:  # noqa: BLE001 - out of memory, or a backend limit: record and go on
                self.rep.error(f"sd {d}", exc)
                continue
            row["model"] = "tiny (tests/fixtures/sd_tiny)" if a.tiny else "SD-1.x full size, random weights"
            row["mfu"] = CR.finite(row["tflops"] / self.ceiling_tflops) if self.ceiling_tflops else None
            row["ahead_compile_s"] = {n: self.futures[f"sd {d} {n}"].result()[1]["compile_s"]
                                      for n in ("sample", "decode")}
            self.rep.data["sd"].append(row)
            self.rep.write()
            print(f"sd {d}: {row['batch']} x {row['size']} px, {row['n_steps']} steps: {row['guided_steps_per_s']:.2f} "
                  f"guided steps/s, {row['images_per_s']:.3f} images/s, {row['tflops']:.2f} TFLOP/s (MFU "
                  f"{CR.fmt(row['mfu'], '.1%')}); compiled ahead in {row['ahead_compile_s']['sample']:.0f} + "
                  f"{row['ahead_compile_s']['decode']:.0f} s", flush=True)

    # ---------------------------------------------------------------- the end
    def finish(self):
        """Ratios against the PyTorch peers, the winners table, and nothing left running."""
        if self.peers is not None:
            self.peers.stop()
        if self.farm is not None:
            self.farm.cancel(self.futures.values())
        data = self.rep.data
        torch_rows = {(r["what"], r["members"]): r["model_steps_per_s"] for r in data["torch"]
                      if r.get("status") == "ok"}
        for r in data["train"]:
            if r.get("status") == "ok":
                ref, ens = torch_rows.get(("reference", 1)), torch_rows.get(("ensemble", r["members"]))
                r["vs_torch_reference"] = r["model_steps_per_s"] / ref if ref else None
                r["vs_torch_ensemble"] = r["model_steps_per_s"] / ens if ens else None
        data["winners"] = CR.winners(data) if data["train"] else []
        if data["winners"]:
            CR.write_json(self.rep.path.parent / "strategies.json", {"measured": data["winners"]})
            for w in data["winners"]:
                how = ", ".join(f"{k} {v:.1f}" for k, v in w["timed"].items())
                span = f"{w['min_members']}-{w.get('max_members', '')}"
                print(f"fastest for {w['members']} members (the table's entry for {span}): {w['strategy']}"
                      + (f"/{w['chunk']}" if w["strategy"] == "map" else "")
                      + (" with model.conv=explicit" if w["conv"] == "explicit" else "")
                      + f" ({w['model_steps_per_s']:.1f} model-steps/s; {how})", flush=True)
