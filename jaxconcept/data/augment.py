"""Photometric and geometric augmentation of images in [0, 1], on the device: torchvision's
ColorJitter and RandomHorizontalFlip (the reference's CelebA transforms) in JAX, one image at a
time (vmap for batches). Pure functions; keys passed in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_LUMA = (0.2989, 0.587, 0.114)  # the grey level torchvision's adjustments blend towards


def _grey(x):  # [H, W, 3] -> [H, W]
    return x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]


def _blend(a, b, ratio):
    return jnp.clip(ratio * a + (1.0 - ratio) * b, 0.0, 1.0)


def rgb_to_hsv(x):
    """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn, as Python's colorsys)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.max(x, axis=-1)
    delta = v - jnp.min(x, axis=-1)
    s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
    d = jnp.where(delta > 0, delta, 1.0)
    h = jnp.where(v == r, (g - b) / d, jnp.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(x):
    """[..., 3] HSV in [0, 1] -> RGB in [0, 1], the inverse of ``rgb_to_hsv``."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = jnp.mod(i, 6).astype(jnp.int32)[..., None]
    # the six sectors of the hue circle: (r, g, b) for i = 0 .. 5
    cands = jnp.stack([jnp.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return jnp.take_along_axis(jnp.moveaxis(cands, 0, -2), i[..., None], axis=-2)[..., 0, :]


def _shift_hue(x, turns):
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + turns, 1.0)))


def colour_jitter(x, key, strength: float):
    """One image [H, W, 3] in [0, 1] jittered as torchvision's ColorJitter(s, s, s, s), in a fixed
    order: brightness, contrast and saturation factors from U(1 - s, 1 + s), then a hue shift from
    U(-s, s) turns, each result clipped to [0, 1].

    torchvision applies the four in a random order per image. Under ``vmap`` a ``lax.switch`` over
    a random order becomes a select over all its branches, so every image would pay for all four
    operations at each of the four positions (the hue shift, an HSV round trip, most of it); a
    fixed order costs one of each. The factors and their ranges are torchvision's.
    """
    lo = jnp.array([1 - strength, 1 - strength, 1 - strength, -strength])
    f = jax.random.uniform(key, (4,), minval=lo, maxval=lo + 2 * strength)
    x = _blend(x, 0.0, f[0])  # brightness: towards black
    x = _blend(x, jnp.mean(_grey(x)), f[1])  # contrast: towards the mean grey level
    x = _blend(x, _grey(x)[..., None], f[2])  # saturation: towards the grey image
    return _shift_hue(x, f[3])


def flip_and_jitter(img, key, strength: float):
    """One image [H, W, 3] in [0, 1]: flipped left-right with probability 1/2, then
    ``colour_jitter``-ed with ``strength`` (none at 0)."""
    k_flip, k_jit = jax.random.split(key)
    img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
    return colour_jitter(img, k_jit, strength) if strength > 0 else img
