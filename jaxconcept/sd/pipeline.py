"""SD-1.x sampling as pure functions: noise schedule, DDIM, classifier-free guidance, decoding.

``StableDiffusion`` bundles the three networks in one Flax module so that parameters are one
tree ``{"text_encoder", "unet", "vae"}`` (the folder's layout) and tap names are unique
(``text_encoder/conditioning``, ``unet/.../attn2/context``; ``tap_names`` lists them).

Schedule (SD-1.x scheduler config): betas scaled-linear, beta_t = (sqrt(0.00085) + (sqrt(0.012) -
sqrt(0.00085)) t / 999)^2 for t = 0..999, alpha_bar_t = prod_{s<=t} (1 - beta_s); inference
timesteps "leading" with offset 1 (t_k = 1000/n k + 1), alpha_bar before t = 0 is alpha_bar_0
(``set_alpha_to_one=False``); latents are the VAE's times 0.18215 (``scaling_factor``).
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.elicit.edits import applying
from jaxconcept.vdm import guidance_mix
from jaxconcept.nets.layers import tap_calls
from jaxconcept.sd.clip import CLIPTextEncoder
from jaxconcept.sd.configs import SDConfig
from jaxconcept.sd.unet import UNet
from jaxconcept.sd.vae import VAEDecoder

BETA_START, BETA_END, N_TRAIN = 0.00085, 0.012, 1000
STEPS_OFFSET = 1


class StableDiffusion(nn.Module):
    """The three networks; methods ``encode``, ``eps``, ``decode`` call one each (see there)."""

    cfg: SDConfig = SDConfig()
    dtype: object = jnp.float32

    def setup(self):
        self.text_encoder = CLIPTextEncoder(self.cfg.clip, self.dtype)
        self.unet = UNet(self.cfg.unet, self.dtype)
        self.vae = VAEDecoder(self.cfg.vae, self.dtype)

    def encode(self, ids, token_scale=None):
        return self.text_encoder(ids, token_scale)

    def eps(self, x, t, context):
        return self.unet(x, t, context)

    def decode(self, z):
        return self.vae(z)

    def __call__(self, ids, x, t):  # every network once: for init and shape tracing
        return self.encode(ids), self.eps(x, t, self.encode(ids)), self.decode(x)


def example_inputs(cfg: SDConfig, latent: int = 8, batch: int = 1):
    """Zero (ids [B, T], latents [B, latent, latent, C], t [B]) for init and tracing."""
    return (jnp.zeros((batch, cfg.clip.max_position_embeddings), jnp.int32),
            jnp.zeros((batch, latent, latent, cfg.unet.in_channels), jnp.float32), jnp.zeros((batch,), jnp.float32))


def init(model: StableDiffusion, key, latent: int = 8) -> dict:
    """Random parameters (Flax's default initialisers): {"text_encoder", "unet", "vae"}."""
    return model.init(key, *example_inputs(model.cfg, latent))["params"]


def tap_names(model: StableDiffusion) -> list[str]:
    """Every tap point's name, in call order (traced with ``jax.eval_shape``: nothing computed)."""
    return tap_calls(lambda: model.init(jax.random.PRNGKey(0), *example_inputs(model.cfg)))


def alphas_cumprod() -> np.ndarray:
    """alpha_bar_t for t = 0..999 [1000] float32 (scaled-linear betas; see the module docstring)."""
    betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, N_TRAIN, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def ddim_timesteps(n_steps: int):
    """The n_steps DDIM timesteps, highest first, and alpha_bar at each and at the step after.

    Returns:
      (t [n] int32, alpha_bar_t [n], alpha_bar_prev [n]) numpy arrays ("leading" spacing, offset
      1: for 50 steps t = 981, 961, ..., 1; alpha_bar_prev of the last step is alpha_bar_0).
    Raises:
      ValueError: n_steps outside 1..1000.
    """
    if not 1 <= n_steps <= N_TRAIN:
        raise ValueError(f"n_steps={n_steps}: allowed 1..{N_TRAIN}")
    ac = alphas_cumprod()
    ratio = N_TRAIN // n_steps
    t = (np.arange(n_steps) * ratio + STEPS_OFFSET)[::-1].astype(np.int32)
    prev = t - ratio
    return t, ac[t], np.where(prev >= 0, ac[np.maximum(prev, 0)], ac[0]).astype(np.float32)


def ddim_step(z, eps, a_t, a_prev):
    """One deterministic DDIM step (eta = 0; Song et al. 2021 eq. 12):
    x0 = (z - sqrt(1 - a_t) eps) / sqrt(a_t);  z' = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    x0 = (z - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps


def guided_eps(model, params, z, t, cond, null, guidance):
    """Classifier-free guidance (Ho & Salimans 2022): eps(null) + w (eps(text) - eps(null)).

    z [B, h, w, C], t scalar timestep, cond [B, T, D], null [T, D]; both halves in one UNet
    batch [null x B; cond]. Returns [B, h, w, C] float32.
    """
    b = z.shape[0]
    ctx = jnp.concatenate([jnp.broadcast_to(null, cond.shape), cond])  # [2B, T, D]
    e = model.apply({"params": params}, jnp.concatenate([z, z]), jnp.full((2 * b,), t, jnp.float32), ctx,
                    method=StableDiffusion.eps)
    return guidance_mix(e[b:], e[:b], guidance)


def _ddim_chunk(model, params, z, cond, null, guidance, ts, a_t, a_prev, edits):
    """DDIM steps at timesteps ``ts`` in one ``lax.scan``, ``edits`` inside every UNet call."""
    def step(z, xs):
        t, at, ap = xs
        return ddim_step(z, guided_eps(model, params, z, t, cond, null, guidance), at, ap), None

    with applying(edits):
        return jax.lax.scan(step, z, (ts, a_t, a_prev))[0]


_ddim_chunk_jit = jax.jit(_ddim_chunk, static_argnums=0)


def chunk_size(n_steps: int, target: int) -> int:
    """The largest divisor of n_steps that is at most ``target`` (so every chunk has one shape)."""
    return max(d for d in range(1, max(1, min(target, n_steps)) + 1) if n_steps % d == 0)


def sample(model, params, cond, null, noise, *, n_steps: int, guidance: float, edits=(), chunk: int | None = None,
           progress=None):
    """DDIM (eta = 0) from ``noise`` with classifier-free guidance: the final latents.

    Args:
      model, params: a ``StableDiffusion`` and its parameters.
      cond: [B, T, D] text conditioning per image; null: [T, D] (the empty prompt's).
      noise: [B, h, w, C] initial latents z_T (standard normal; DDIM's initial sigma is 1).
      n_steps, guidance: DDIM steps and the guidance weight w (1: no guidance).
      edits: ``jaxconcept.elicit.edits.Edit``s at UNet tap points, applied in every step (both CFG halves).
      chunk: steps per jitted call, each one ``lax.scan`` (rounded down to a divisor of n_steps;
        default all in one call); ``progress`` (e.g. ``tqdm.update``) gets each chunk's count.
    Returns:
      z_0 [B, h, w, C] float32.
    """
    ts, a_t, a_prev = ddim_timesteps(n_steps)
    k = chunk_size(n_steps, chunk or n_steps)
    z, edits = jnp.asarray(noise, jnp.float32), tuple(edits)
    for i in range(0, n_steps, k):
        sl = slice(i, i + k)
        z = _ddim_chunk_jit(model, params, z, cond, null, jnp.float32(guidance), ts[sl], a_t[sl], a_prev[sl], edits)
        if progress is not None:
            jax.block_until_ready(z)
            progress(k)
    return z


def generate(model, params, cond, null, noise, *, n_steps: int, guidance: float, edits=(), chunk: int | None = None,
             progress=None):
    """Images of every text conditioning in ``cond`` from the *same* initial noise.

    Args:
      cond: [S, T, D] (e.g. one per overprompting strength); null: [T, D].
      noise: [h, w, C] z_T shared by all S rows; the rest as ``sample``.
    Returns:
      [S, H, W, 3] float32 in [0, 1] (H = h times the VAE's upsampling factor).
    """
    z = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), (cond.shape[0], *noise.shape))
    z = sample(model, params, cond, null, z, n_steps=n_steps, guidance=guidance, edits=edits, chunk=chunk,
               progress=progress)
    return decode(model, params, z)


@partial(jax.jit, static_argnums=0)
def encode(model, params, ids, token_scale=None, edits=()):
    """Text conditioning [B, T, D] of token ids [B, T] (``token_scale`` [B, T]: see
    ``CLIPTextEncoder``), ``edits`` applied at text-encoder tap points."""
    with applying(edits):
        return model.apply({"params": params}, ids, token_scale, method=StableDiffusion.encode)


@partial(jax.jit, static_argnums=0)
def eps(model, params, x, t, context, edits=()):
    """The UNet's eps prediction [B, h, w, C] for latents x [B, h, w, C], timesteps t [B] and
    conditioning context [B, T, D], ``edits`` applied."""
    with applying(edits):
        return model.apply({"params": params}, x, t, context, method=StableDiffusion.eps)


@partial(jax.jit, static_argnums=0)
def decode(model, params, z):
    """Images [B, H, W, 3] in [0, 1] of final latents z [B, h, w, C]: the VAE decoder of
    z / scaling_factor, mapped from [-1, 1] and clipped (diffusers' image post-processing)."""
    x = model.apply({"params": params}, z / model.cfg.vae.scaling_factor, method=StableDiffusion.decode)
    return jnp.clip((x + 1) / 2, 0.0, 1.0)


@partial(jax.jit, static_argnums=(0, 3))
def _capture(model, params, ids, points, token_scale=None):
    got = {}
    with applying((), got, points):
        model.apply({"params": params}, ids, token_scale, method=StableDiffusion.encode)
    return got


def capture(model, params, ids, points, token_scale=None) -> dict:
    """Text-encoder activations at ``points`` for ids [B, T]: {name: [B, T, D]}.

    Raises:
      ValueError: a point that is not a text-encoder tap.
    """
    got = _capture(model, params, jnp.asarray(ids), tuple(points), token_scale)
    missing = [p for p in points if p not in got]
    if missing:
        raise ValueError(f"no text-encoder activation at {missing}")
    return got
