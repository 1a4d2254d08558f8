"""A stack's programs ahead of time: the abstract inputs of init, advance and evaluate, their
lowering (for the stack's platform or another) and compiling them side by side."""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxconcept import data as D
from jaxconcept.train.step import hyper_values

if TYPE_CHECKING:  # the stack calls this module; it is not imported here
    from jaxconcept.train.stack import Stack


def abstract_inputs(sw: Stack) -> dict:
    """ShapeDtypeStructs (with their shardings) of each program's arguments, as ``init``,
    ``advance`` and ``evaluate`` pass them: {program name: tuple of arguments}."""
    m, sh, rep = len(sw.padded), sw.sharding(), sw.replicated()
    put = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)  # noqa: E731
    seeds = jax.ShapeDtypeStruct((m,), jnp.int32)
    dparams = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sw.data_params)
    hyper = {k: jax.ShapeDtypeStruct((m,), jnp.float32) for k in hyper_values(sw.padded)}
    state, data = jax.eval_shape(sw.jitted.init, seeds, dparams, hyper)
    if sw.host_fed:
        data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in sw.host_eval.items()}
    batches = None
    if sw.host_fed:
        k, b = sw.steps_per_call, sw.cfg.train.batch_size
        batches = {"x": jax.ShapeDtypeStruct((m, k, b, *sw.spec.x_shape), D.host_dtype(sw.spec)),
                   "c": jax.ShapeDtypeStruct((m, k, b, sw.spec.cond_dim), jnp.float32),
                   "n": jax.ShapeDtypeStruct((m, k), jnp.int32)}
    state, data, batches = (jax.tree.map(put, t) for t in (state, data, batches))
    ec = sw.cfg.eval
    prompts = jax.ShapeDtypeStruct((m, sw.spec.n_classes, ec.n_samples, sw.spec.cond_dim), jnp.float32, sharding=sh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return {"init": (put(seeds), jax.tree.map(put, dparams), jax.tree.map(put, hyper)),
            "advance": (state, data, batches, scalar),
            "evaluate": (state, data, prompts, put(seeds), scalar)}


_WHAT = {"init": "initialisation", "advance": "training step", "evaluate": "evaluation (sampler and held-back losses)"}


def _kernel_rng():
    """On GPUs, Threefry as one kernel per call instead of ~265 inlined ops (JAX's
    jax_threefry_gpu_kernel_lowering: the same bits; init is ~95 % random-number hashing
    otherwise). Applies to the lowering for cuda/rocm only; CPU and TPU lower as before."""
    from jax._src import config as jax_config  # the option's scoped form (thread-local, part of the jit key)

    state = getattr(jax_config, "threefry_gpu_kernel_lowering", None)
    return state(True) if state is not None else contextlib.nullcontext()


def lower(sw: Stack, name: str, platforms=None):
    """The lowered program ``name`` of ``sw`` (``jax.stages.Lowered``), for the sweep's own
    platform or for ``platforms`` (e.g. ("cuda",) to inspect a GPU program on a CPU)."""
    with _kernel_rng():
        traced = getattr(sw.jitted, name).trace(*abstract_inputs(sw)[name])
        return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()


def compile_programs(sw: Stack, names) -> dict:
    """Compile ``names`` (of ``Programs._fields``) ahead of time: traced and lowered one after
    another, then compiled side by side (XLA compiles without the GIL), so the first step waits
    for the longest compile, not the sum. Says so in one line on the jaxconcept logger.
    Returns {name: jax.stages.Compiled}."""
    log = logging.getLogger("jaxconcept")
    what = " and the ".join([", ".join(_WHAT[n] for n in names[:-1]), _WHAT[names[-1]]] if len(names) > 1
                            else [_WHAT[names[0]]])
    t0 = time.perf_counter()
    log.info("compiling the %s for %d member(s)…", what, sw.size)
    lowered = {n: lower(sw, n) for n in names}
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        futures = {n: pool.submit(low.compile) for n, low in lowered.items()}
        out = {n: f.result() for n, f in futures.items()}
    log.info("compiled in %.1f s", time.perf_counter() - t0)
    return out
