"""Stable Diffusion 1.x sampling speed (jaxconcept.sd) on whatever device JAX sees.

Full-size SD-1.x shapes with random weights by default (nothing to download), or a local
diffusers-layout folder's configs and weights (``--folder``); the tiny test model with ``--tiny``:

    python benchmarks/sd_bench.py --dtypes bfloat16,float32 --batch 4          # 512 px, 50 steps
    python benchmarks/sd_bench.py --folder /path/to/stable-diffusion-v1-4
    python benchmarks/sd_bench.py --tiny                                       # seconds, on a CPU

Per compute dtype: the 50-step DDIM sampler with classifier-free guidance (one ``lax.scan``; each
step one UNet call on 2 x batch latents) and the VAE decoder, each compiled, warmed up and timed:
guided UNet steps/s, images/s (sampling + decoding), FLOPs per guided step (XLA's cost
analysis) and TFLOP/s. ``benchmarks/device_check.py`` runs ``measure`` as its SD stage.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TINY = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sd_tiny"


def random_params(cfg, seed: int = 0):
    """Parameters of ``cfg``'s shapes for timing: weights 0.02 x one block of 2^20 standard-normal
    draws repeated (fast at 1B parameters, and speed does not depend on the values), unit norm
    scales."""
    import jax
    import numpy as np

    from jaxconcept.sd import weights

    block = 0.02 * np.random.default_rng(seed).standard_normal(2 ** 20, dtype=np.float32)

    def fill(path, s):
        if path[-1].key == "scale":
            return np.ones(s.shape, np.float32)
        reps = -(-s.size // block.size)
        return (np.tile(block, reps) if reps > 1 else block)[:s.size].reshape(s.shape)

    return jax.tree_util.tree_map_with_path(fill, weights.template(cfg))


def _timed(call, min_time: float, fits) -> tuple[int, float]:
    """Run ``call`` at least twice and until ``min_time`` has passed or ``fits`` says stop."""
    n, t0 = 0, time.perf_counter()
    while True:
        call()
        n += 1
        dt = time.perf_counter() - t0
        if n >= 2 and (dt >= min_time or not fits(dt / n)):
            return n, dt


def _inputs(cfg, batch: int, lat: int):
    """The conditioning, null prompt and initial latents ``measure`` samples from."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    cond = jax.random.normal(k1, (batch, cfg.clip.max_position_embeddings, cfg.clip.hidden_size))
    return cond, jnp.zeros(cond.shape[1:]), jax.random.normal(k2, (batch, lat, lat, cfg.unet.in_channels))


def lowered(cfg, dtype: str, size: int, batch: int, n_steps: int) -> dict:
    """The two programs ``measure`` compiles (the whole DDIM sampler, one ``lax.scan``, and the
    VAE decoder), lowered from shapes alone: compiled ahead of time they land in JAX's
    persistent compilation cache (when it is on), where ``measure``'s calls find them.
    Returns {"sample": jax.stages.Lowered, "decode": jax.stages.Lowered}."""
    import jax
    import jax.numpy as jnp

    from jaxconcept.sd import pipeline as P, weights

    model = P.StableDiffusion(cfg, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    lat = size // 2 ** (len(cfg.vae.block_out_channels) - 1)
    params = weights.template(cfg)
    cond, null, noise = jax.eval_shape(lambda: _inputs(cfg, batch, lat))
    ts, a_t, a_prev = P.ddim_timesteps(n_steps)
    return {"sample": P._ddim_chunk_jit.lower(model, params, noise, cond, null, jnp.float32(7.5), ts, a_t, a_prev, ()),
            "decode": P.decode.lower(model, params, noise)}


def measure(cfg, dtype: str, size: int, batch: int, n_steps: int, min_time: float, fits=lambda s: True,
            params=None) -> dict:
    """Sampling and decoding speed of ``batch`` images of ``size`` px in ``dtype``.

    ``params``: the model's (default random); ``fits(seconds)`` says whether one more timed call
    still fits the caller's budget. Returns a JSON-ready dict (seconds, rates, FLOPs)."""
    import jax
    import jax.numpy as jnp

    from jaxconcept.sd import pipeline as P

    model = P.StableDiffusion(cfg, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    lat = size // 2 ** (len(cfg.vae.block_out_channels) - 1)
    t = time.perf_counter()
    params = jax.device_put(random_params(cfg) if params is None else params)
    init_s = time.perf_counter() - t
    cond, null, noise = _inputs(cfg, batch, lat)
    out = {"dtype": dtype, "size": size, "latent": lat, "batch": batch, "n_steps": n_steps, "init_s": init_s}
    x2, t2, c2 = jnp.concatenate([noise, noise]), jnp.zeros((2 * batch,)), jnp.concatenate([cond, cond])
    out["flops_per_guided_step"] = float(P.eps.lower(model, params, x2, t2, c2).cost_analysis()["flops"])
    z = {}

    def sample():
        z["z"] = jax.block_until_ready(P.sample(model, params, cond, null, noise, n_steps=n_steps, guidance=7.5))

    def decode():
        jax.block_until_ready(P.decode(model, params, z["z"]))

    for name, call in (("sample", sample), ("decode", decode)):
        t = time.perf_counter()
        call()  # compile and warm up
        first = time.perf_counter() - t
        calls, dt = _timed(call, min_time, fits)
        out[f"{name}_s"], out[f"{name}_calls"] = dt / calls, calls
        out[f"{name}_compile_s"] = max(first - dt / calls, 0.0)
    out["guided_steps_per_s"] = n_steps / out["sample_s"]
    out["unet_images_per_s"] = 2 * batch * out["guided_steps_per_s"]  # latents through the UNet per second
    out["images_per_s"] = batch / (out["sample_s"] + out["decode_s"])
    out["tflops"] = out["guided_steps_per_s"] * out["flops_per_guided_step"] / 1e12
    out["finite"] = bool(jnp.isfinite(z["z"]).all())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the test fixture's tiny model, 32 px, 2 steps")
    ap.add_argument("--folder", default=None, help="a local SD-1.x folder (diffusers layout): its weights")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--size", type=int, default=None, help="pixels (512; tiny 32)")
    ap.add_argument("--batch", type=int, default=None, help="images per call (4; tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (50; tiny 2)")
    ap.add_argument("--measure-s", type=float, default=3.0)
    a = ap.parse_args(argv)
    from jaxconcept.sd import configs, weights

    cfg = configs.from_folder(a.folder or TINY) if (a.folder or a.tiny) else configs.SDConfig()
    params = weights.load_params(a.folder, cfg) if a.folder else None
    rows = [measure(cfg, d, a.size or (32 if a.tiny else 512), a.batch or (1 if a.tiny else 4),
                    a.steps or (2 if a.tiny else 50), a.measure_s, params=params) for d in a.dtypes.split(",") if d]
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
