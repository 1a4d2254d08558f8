"""The image data-generating process G (SPEC A1) in pure JAX: jittable, vmappable, differentiable.

A concept vector z has 11 entries, [shape one-hot (2), x, y, colour RGB (3), size, bg RGB (3)];
it is also the conditioning vector once non-compositional (and masked) entries are zeroed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.data import DataSpec

SLOTS = {"shape": slice(0, 2), "x": slice(2, 3), "y": slice(3, 4), "colour": slice(4, 7), "size": slice(7, 8),
         "background": slice(8, 11)}
NAMES = {"shape": ("circle", "triangle"), "colour": ("red", "blue"), "size": ("large", "small"),
         "background": ("light", "dark")}


def _value_box(concept: str, k: int, n: int, sep_col: float, sep_size: float):
    """(low, high) of the entries of ``concept`` for its value k of n (SPEC A1); None = position."""
    f = k / (n - 1)
    if concept == "shape":
        v = np.eye(2)[k]
        return v, v
    if concept == "colour":
        h = sep_col / 2
        mean = np.array([0.5 + h, 0.5 - h, 0.5 - h]) * (1 - f) + np.array([0.5 - h, 0.5 - h, 0.5 + h]) * f
        return mean - sep_col / 8, mean + sep_col / 8
    if concept == "size":
        h = sep_size / 2
        mean = (0.45 + h) * (1 - f) + (0.45 - h) * f
        r = sep_size * 3 / 8
        return np.array([max(mean - r, 0.1)]), np.array([max(mean + r, 0.1)])
    mean = 0.9 * (1 - f) + 0.1 * f  # background: light -> dark
    return np.full(3, mean - 0.1), np.full(3, mean + 0.1)


def spec(cfg) -> DataSpec:
    concepts, values = tuple(cfg.concepts), tuple(cfg.values)
    n_classes = int(np.prod(values))
    value_names = tuple(NAMES[c] if v == 2 else tuple(f"{c}{i}" for i in range(v)) for c, v in zip(concepts, values))
    names = []
    for c in range(n_classes):
        idx = np.unravel_index(c, values)
        names.append("-".join(value_names[i][k] for i, k in enumerate(idx)))
    held = tuple(sorted(cfg.held_out))
    n_val = max(1, int(round(cfg.val_frac * cfg.n_per_class)))
    cond_mask = np.zeros(11, np.float32)
    for c in concepts:
        if c not in cfg.masked:
            cond_mask[SLOTS[c]] = 1.0
    extra = (("image_size", cfg.image_size), ("blur_sigma", cfg.blur_sigma), ("pixel_noise", cfg.pixel_noise),
             ("cond_mask", tuple(cond_mask.tolist())))
    return DataSpec(kind="images", x_shape=(cfg.image_size, cfg.image_size, 3), cond_dim=11, n_classes=n_classes,
                    concepts=concepts, values=values, value_names=value_names, class_names=tuple(names),
                    train_classes=tuple(c for c in range(n_classes) if c not in held), held_out=held,
                    n_train=cfg.n_per_class - n_val, n_val=n_val, n_test=cfg.n_test, extra=extra)


def params(cfg) -> dict:
    """Per-class boxes of z: {"lo": [n_classes, 11], "hi": [n_classes, 11]}."""
    concepts, values = tuple(cfg.concepts), tuple(cfg.values)
    n_classes = int(np.prod(values))
    lo, hi = np.zeros((n_classes, 11), np.float32), np.zeros((n_classes, 11), np.float32)
    lo[:, 2:4], hi[:, 2:4] = -0.5, 0.5  # position ~ U(-0.5, 0.5), never a class concept here
    for c in range(n_classes):
        idx = dict(zip(concepts, np.unravel_index(c, values)))
        for concept in ("shape", "colour", "size", "background"):
            if concept in idx:
                a, b = _value_box(concept, int(idx[concept]), values[concepts.index(concept)], cfg.sep_col, cfg.sep_size)
            elif concept == "background":
                a, b = np.full(3, 0.8), np.full(3, 1.0)
            else:  # not a concept: circle, the red colour range, the large size range
                a, b = _value_box(concept, 0, 2, cfg.sep_col, cfg.sep_size)
            lo[c, SLOTS[concept]], hi[c, SLOTS[concept]] = a, b
    return {"lo": jnp.asarray(lo), "hi": jnp.asarray(hi)}


def _blur_kernel(sigma: float):
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / max(sigma, 1e-6)) ** 2)
    return jnp.asarray(k / k.sum(), jnp.float32)


def render(z, key, image_size: int = 32, blur_sigma: float = 1.0, pixel_noise: float = 0.001):
    """G(z): one image [S, S, 3] in [0, 1]; axis 0 is the x coordinate (ij grid on [-1, 1]).

    The object mask has a one-pixel linear edge (instead of a hard step) so G is differentiable
    in position and size; after the sigma = 1 px blur the difference from a hard mask is small.
    """
    g = jnp.linspace(-1.0, 1.0, image_size)
    px = 2.0 / (image_size - 1)
    dx, dy = g[:, None] - z[2], g[None, :] - z[3]  # [S, S]
    size = z[7]
    circle = jnp.clip((size - jnp.sqrt(dx ** 2 + dy ** 2 + 1e-12)) / px + 0.5, 0.0, 1.0)
    side = size * math.sqrt(4 * math.pi / math.sqrt(3))  # equilateral triangle of the circle's area
    r_in = side / (2 * math.sqrt(3))
    ang = jnp.deg2rad(jnp.array([-90.0, 30.0, 150.0]))  # outward edge normals; apex points to +y
    d = jnp.max(jnp.cos(ang)[:, None, None] * dx[None] + jnp.sin(ang)[:, None, None] * dy[None], axis=0) - r_in
    triangle = jnp.clip(-d / px + 0.5, 0.0, 1.0)
    m = z[0] * circle + z[1] * triangle
    if blur_sigma > 0:
        k = _blur_kernel(blur_sigma)
        m = jax.vmap(lambda row: jnp.convolve(row, k, mode="same"))(m)
        m = jax.vmap(lambda col: jnp.convolve(col, k, mode="same"), in_axes=1, out_axes=1)(m)
    m = m[..., None]
    img = m * z[None, None, 4:7] + (1.0 - m) * z[None, None, 8:11] + pixel_noise * jax.random.normal(key, (image_size, image_size, 3))
    return jnp.clip(img, 0.0, 1.0)


def _render_batch(spec: DataSpec, z, key):
    keys = jax.random.split(key, z.shape[0])
    return jax.vmap(lambda zz, k: render(zz, k, spec.opt("image_size"), spec.opt("blur_sigma"),
                                         spec.opt("pixel_noise")))(z, keys)


def _cond(spec: DataSpec, z):
    return z * jnp.asarray(spec.opt("cond_mask"), jnp.float32)[None, :]


def sample(spec: DataSpec, params, key, labels):
    """Draw z uniformly in each label's class box and render: (x [N,S,S,3], cond [N,11])."""
    k_z, k_img = jax.random.split(key)
    lo, hi = params["lo"][labels], params["hi"][labels]  # [N, 11]
    z = lo + (hi - lo) * jax.random.uniform(k_z, lo.shape)
    return _render_batch(spec, z, k_img), _cond(spec, z)


def class_means(spec: DataSpec, params):
    """z at each class's mean (position at the centre): [n_classes, 11]."""
    z = 0.5 * (params["lo"] + params["hi"])
    return z.at[:, 2:4].set(0.0)


def prompts(spec: DataSpec, params):
    return _cond(spec, class_means(spec, params))


def render_prompts(spec: DataSpec, params, key, n_per_class: int):
    """Images at the class means (random position): what a perfect model would draw per prompt."""
    labels = jnp.repeat(jnp.arange(spec.n_classes), n_per_class)
    z = class_means(spec, params)[labels]
    z = z.at[:, 2:4].set(jax.random.uniform(jax.random.fold_in(key, 1), (labels.shape[0], 2), minval=-0.5, maxval=0.5))
    return _render_batch(spec, z, key), labels


def concept_signal(cfg, key, n: int = 256) -> dict:
    """sigma_i = E ||dG/du_i||: u_i moves concept i from its first value's mean (u=0) to its second's
    (u=1) with every other entry drawn from the data distribution; u ~ U(0, 1); noise-free G.

    The separation sets the length of the move, so sigma_colour grows with sep_col and
    sigma_size with sep_size.
    """
    sp, p = spec(cfg), params(cfg)
    k_lab, k_z, k_u = jax.random.split(key, 3)
    labels = jax.random.randint(k_lab, (n,), 0, sp.n_classes)
    lo, hi = p["lo"][labels], p["hi"][labels]
    z = lo + (hi - lo) * jax.random.uniform(k_z, lo.shape)
    u = jax.random.uniform(k_u, (n,))
    out = {}
    for c, v in zip(sp.concepts, sp.values):
        a = np.mean(_value_box(c, 0, v, cfg.sep_col, cfg.sep_size), axis=0)
        b = np.mean(_value_box(c, 1, v, cfg.sep_col, cfg.sep_size), axis=0)
        sl = SLOTS[c]

        def g(uu, zz):
            zz = zz.at[sl].set(jnp.asarray(a) + uu * jnp.asarray(b - a))
            return render(zz, jax.random.PRNGKey(0), sp.opt("image_size"), sp.opt("blur_sigma"), 0.0)

        norms = jax.vmap(lambda uu, zz: jnp.linalg.norm(jax.jvp(lambda q: g(q, zz), (uu,), (jnp.ones(()),))[1]))(u, z)
        out[c] = float(jnp.mean(norms))
    return out
