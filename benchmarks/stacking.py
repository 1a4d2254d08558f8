"""The stacked-training measurements of ``device_check.py``: which configurations, how their
programs are compiled (in the background, side by side), one init shared by every stack size,
and the timing of one configuration.

Every configuration is the run's own config (``experiments/colour_sweep_mini.json`` by default)
with only the member count, the compute dtype, the stacking and the convolution formulation
changed, so the 8-member bf16 programs *are* the run's and JAX's persistent compilation cache
serves ``jaxconcept train`` afterwards. The engine's public API is used throughout:
``stack.build``, ``programs.lower``, ``programs.abstract_inputs``, ``stack.put``/``Stack.sharding``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import queue
import threading
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Row:
    """One stacked training configuration: ``stacking`` is "vmap", "map/CHUNK" (``lax.map`` over
    chunks of CHUNK vmapped members), "vmap+explicit" (vmap with ``model.conv="explicit"``:
    1x1, strided and transposed convolutions as matmuls with the member axis as a batch
    dimension) or "unroll"."""

    dtype: str
    members: int
    strategy: str  # stack.STRATEGIES
    chunk: int = 1
    conv: str = "auto"

    @property
    def stacking(self) -> str:
        if self.strategy == "map":
            return f"map/{self.chunk}"
        return self.strategy + ("+explicit" if self.conv == "explicit" else "")

    @property
    def label(self) -> str:
        return f"train {self.dtype} members={self.members} {self.stacking}"


def stackings(members: int, backend: str, chunks=(1, 8, 32)) -> list[tuple]:
    """(strategy, chunk, conv) to compare for a stack of ``members``: vmap, lax.map over chunks
    (each chunk of ``chunks`` below ``members`` that divides it into at most 32 sequential
    pieces), and vmap of the "explicit" formulation (where it differs from the default: not on a
    CPU, whose default it is; there the engine's CPU choice "unroll" leads instead)."""
    if members == 1:
        return [("unroll" if backend == "cpu" else "vmap", 1, "auto")]
    out = [("unroll", 1, "auto")] if backend == "cpu" else []
    out.append(("vmap", 1, "auto"))
    out += [("map", c, "auto") for c in chunks if c < members and members % c == 0 and members // c <= 32]
    if backend != "cpu":
        out.append(("vmap", 1, "explicit"))
    return out


def plan_rows(members, dtypes, fp32_members, backend: str, chunks=(1, 8, 32), run_members: int | None = None,
              compare: bool = True) -> list[Row]:
    """The rows in measurement priority: every stack size in the first dtype, the run's size
    first, each in every stacking (``compare``) or the first only; then the other dtypes for
    those of ``fp32_members`` in ``members``, first stacking only."""
    order = sorted(members, key=lambda m: (m != run_members, members.index(m)))
    rows = []
    for m in order:
        options = stackings(m, backend, chunks)
        rows += [Row(dtypes[0], m, s, c, conv) for s, c, conv in (options if compare else options[:1])]
    for d in dtypes[1:]:
        rows += [Row(d, m, *stackings(m, backend, chunks)[0]) for m in fp32_members if m in members]
    return rows


def member_config(base, m: int):
    """``base`` with ``m`` members, everything else equal: ``base`` itself when it has m; a
    multiple of its member count repeats its sweep over more seeds; any other count keeps the
    first value of each swept field over m seeds."""
    from jaxconcept import config as C

    n0 = len(C.members(base))
    if m == n0:
        return base
    seeds = base.seeds
    if m % n0 == 0 and len(seeds) == 1:
        return C.override(base, [f"seeds={list(range(seeds[0], seeds[0] + m // n0))}"])
    firsts = [f"{a}={json.dumps(v[0])}" for a, v in base.sweep if a != "seeds"]
    return C.override(base, firsts + [f"seeds={list(range(m))}"])


def row_sweep(base, row: Row, devices):
    """The ``stack.Stack`` of ``row`` (the run's config but for members, dtype, conv)."""
    from jaxconcept import config as C
    from jaxconcept.train import stack

    cfg = member_config(base, row.members)
    sets = [] if cfg.model.dtype == row.dtype else [f'model.dtype="{row.dtype}"']
    sets += [] if row.conv == cfg.model.conv else [f'model.conv="{row.conv}"']
    cfg = C.override(cfg, sets) if sets else cfg
    return stack.build(cfg, devices, strategy=row.strategy, chunk=row.chunk)


# --------------------------------------------------------------------------------------------
# Compiling in the background
# --------------------------------------------------------------------------------------------
class Farm:
    """Programs lowered one at a time on one background thread, in submission order (tracing
    holds the GIL), and compiled side by side on ``workers`` more (XLA compiles without it).
    All daemon threads: a compile still running when the process ends is abandoned.

    ``submit(name, lower)`` -> a Future of (jax.stages.Compiled, {"lower_s", "compile_s",
    "in_flight_at_start"}); ``lower()`` returns a ``jax.stages.Lowered``."""

    def __init__(self, workers: int):
        self._lower_q, self._compile_q = queue.Queue(), queue.Queue()
        self._lock = threading.Lock()
        self.compiling = 0  # compiles in flight
        self.queued = 0  # submitted, not yet compiled
        threading.Thread(target=self._lowerer, daemon=True, name="farm-lower").start()
        for i in range(max(1, workers)):
            threading.Thread(target=self._compiler, daemon=True, name=f"farm-compile-{i}").start()

    def submit(self, name: str, lower) -> concurrent.futures.Future:
        fut = concurrent.futures.Future()
        fut.name = name
        with self._lock:
            self.queued += 1
        self._lower_q.put((lower, fut))
        return fut

    def busy(self) -> int:
        """Programs submitted and not yet compiled (lowering, queued or compiling)."""
        with self._lock:
            return self.queued

    def cancel(self, futures):
        """Drop the programs of ``futures`` that have not started lowering."""
        for f in futures:
            if f.cancel():
                with self._lock:
                    self.queued -= 1

    def _lowerer(self):
        while True:
            lower, fut = self._lower_q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            t = time.perf_counter()
            try:
                low = lower()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                self._done(fut, exc=exc)
                continue
            self._compile_q.put((low, fut, {"lower_s": time.perf_counter() - t}))

    def _compiler(self):
        while True:
            low, fut, info = self._compile_q.get()
            with self._lock:
                info["in_flight_at_start"] = self.compiling
                self.compiling += 1
            t = time.perf_counter()
            try:
                compiled = low.compile()
            except BaseException as exc:  # noqa: BLE001
                self._done(fut, exc=exc, compiling=True)
                continue
            info["compile_s"] = time.perf_counter() - t
            self._done(fut, result=(compiled, info), compiling=True)

    def _done(self, fut, result=None, exc=None, compiling=False):
        with self._lock:
            self.queued -= 1
            self.compiling -= compiling
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


# --------------------------------------------------------------------------------------------
# One init for every stack size, and the timing
# --------------------------------------------------------------------------------------------
def init_state(sw, compiled_init):
    """The stacked state and data of ``sw`` from its compiled ``init`` program, called with the
    arguments ``stack.init`` passes."""
    import jax

    from jaxconcept.train import stack
    from jaxconcept.train.step import hyper_values

    if sw.host_fed:
        raise ValueError("device_check trains on-device data kinds only (images, vectors)")
    ms = sw.padded
    put = lambda a: stack.put(sw, a)  # noqa: E731
    return jax.block_until_ready(compiled_init(put(stack.seeds_array(sw, ms)),
                                               jax.tree.map(put, stack.stacked_data_params(sw, ms)),
                                               {k: put(v) for k, v in hyper_values(ms).items()}))


def resize(tree, m: int, sw):
    """A fresh copy of a stacked pytree with ``m`` members on ``sw``'s mesh: the first m, or the
    members repeated up to m (a timing does not depend on which members are stacked). One jitted
    program per call, not one small program per leaf."""
    import jax
    import jax.numpy as jnp

    def one(a):
        n = a.shape[0]
        return jnp.concatenate([a] * -(-m // n))[:m] if m > n else a[:m]
    return jax.block_until_ready(jax.jit(lambda t: jax.tree.map(one, t), out_shardings=sw.sharding())(tree))


def compiled_bytes(compiled):
    """Arguments + outputs + temporaries - donated bytes of a compiled program (XLA's memory
    analysis), or None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def peak_bytes(device):
    """The device allocator's running peak (bytes), or None where the backend keeps no statistics."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return stats.get("peak_bytes_in_use") if stats else None


def time_advance(sw, compiled, state, data, min_time: float, fits, target_call_s: float = 0.5) -> dict:
    """Model-steps/s of a compiled ``advance`` program: one warm-up call of one step, then calls
    of n steps (n <= K chosen so that a call takes about ``target_call_s``) until ``min_time``
    has passed or ``fits(seconds)`` says one more call would not fit. ``state`` is donated."""
    import jax

    from jaxconcept.train import stack

    k = sw.steps_per_call
    holder = {"state": state}

    def call(n):
        holder["state"], loss = compiled(holder["state"], data, None, stack.scalar(sw, n))
        holder["loss"] = jax.block_until_ready(loss)

    t = time.perf_counter()
    call(1)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    call(1)
    one_s = time.perf_counter() - t
    n = int(min(k, max(1, round(target_call_s / max(one_s, 1e-6)))))
    calls, t0 = 0, time.perf_counter()
    while True:
        call(n)
        calls += 1
        dt = time.perf_counter() - t0
        if calls >= 2 and (dt >= min_time or not fits(dt / calls)):
            break
    loss = np.asarray(jax.device_get(holder["loss"]))
    holder.clear()
    return {"steps_per_call": k, "n_per_call": n, "first_call_s": first_s, "calls": calls, "seconds": dt,
            "step_s": dt / (calls * n), "model_steps_per_s": sw.size * n * calls / dt,
            "loss_finite": bool(np.isfinite(loss[: sw.size]).all())}
