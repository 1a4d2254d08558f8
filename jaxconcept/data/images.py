"""The image data-generating process G (docs/study.md A1) in pure JAX: jittable, vmappable, differentiable.

A concept vector z has 11 entries, [shape one-hot (2), x, y, colour RGB (3), size, bg RGB (3)];
it is also the conditioning vector once non-compositional (and masked) entries are zeroed.
"""
from __future__ import annotations

import functools
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
    """(low, high) of the entries of ``concept`` for its value k of n (docs/study.md A1); None = position."""
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
    cond_mask, unmasked = np.zeros(11, np.float32), np.zeros(11, np.float32)
    for c in concepts:
        (unmasked if c in cfg.masked else cond_mask)[SLOTS[c]] = 1.0
    extra = (("image_size", cfg.image_size), ("blur_sigma", cfg.blur_sigma), ("pixel_noise", cfg.pixel_noise),
             ("cond_mask", tuple(cond_mask.tolist())), ("unmasked", tuple(unmasked.tolist())))
    return DataSpec(kind="images", x_shape=(cfg.image_size, cfg.image_size, 3), cond_dim=11, n_classes=n_classes,
                    concepts=concepts, values=values, value_names=value_names, class_names=tuple(names),
                    train_classes=tuple(c for c in range(n_classes) if c not in held), held_out=held,
                    n_train=cfg.n_per_class - n_val, n_val=n_val, n_test=cfg.n_test, extra=extra)


def params(cfg) -> dict:
    """Per-class boxes of z: {"lo": [n_classes, 11], "hi": [n_classes, 11]}, and "mask_prob" (scalar)."""
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
    return {"lo": jnp.asarray(lo), "hi": jnp.asarray(hi), "mask_prob": jnp.float32(cfg.mask_prob)}


def _blur_kernel(sigma: float, truncate: float = 4.0):
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius int(truncate sigma + 0.5), normalised."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def _blur(m, sigma: float):
    """Separable Gaussian blur of a mask [S, S] as scipy.ndimage.gaussian_filter(m, sigma) does it:
    mode "reflect" (the edge pixel repeated: d c b a | a b c d | d c b a), truncate 4.0."""
    k = _blur_kernel(sigma)
    r = len(k) // 2
    for axis in (0, 1):
        n = m.shape[axis]
        idx = np.arange(-r, n + r)
        while idx.min() < 0 or idx.max() >= n:  # reflect until in range (kernels wider than the image)
            idx = np.where(idx < 0, -idx - 1, idx)
            idx = np.where(idx >= n, 2 * n - idx - 1, idx)
        mp = jnp.take(m, jnp.asarray(idx), axis=axis)  # [S + 2r, S] or [S, S + 2r]
        taps = [jax.lax.slice_in_dim(mp, i, i + n, axis=axis) for i in range(len(k))]
        m = sum(float(w) * t for w, t in zip(k, taps))
    return m


def _masks(dx, dy, size, soft: float):
    """Circle and triangle masks of the reference's G: circle r < size; triangle (the reference's,
    of side s = sqrt(4 pi / sqrt(3)) size: base s at dy = -s sqrt(3)/6, apex s above it, edges of
    slope +-2). ``soft`` > 0: a linear edge of that width (concept-space units) instead of a step."""
    def inside(d):  # d > 0 inside
        return (d > 0).astype(jnp.float32) if not soft else jnp.clip(d / soft + 0.5, 0.0, 1.0)
    circle = inside(size - jnp.sqrt(dx ** 2 + dy ** 2 + 1e-12))
    side = size * math.sqrt(4 * math.pi / math.sqrt(3))
    inc = side * math.sqrt(3) / 6
    b = (1 - math.sqrt(3) / 6) * side
    dist = jnp.minimum(jnp.minimum(dy + inc, (2 * dx + b - dy) / math.sqrt(5)), (-2 * dx + b - dy) / math.sqrt(5))
    return circle, inside(dist)


def render(z, key, image_size: int = 32, blur_sigma: float = 1.0, pixel_noise: float = 0.001, soft_edge: bool = False):
    """G(z): one image [S, S, 3] in [0, 1]; axis 0 is the x coordinate (ij grid on [-1, 1]).

    As the reference: a hard object mask (circle ``r < size``, or its triangle), blurred like
    scipy.ndimage.gaussian_filter(mask, blur_sigma) (reflect at the border, radius 4 sigma), then
    mask * colour + (1 - mask) * background + N(0, pixel_noise^2), clipped to [0, 1].
    ``soft_edge``: a one-pixel linear edge instead of the step, so G is differentiable in position
    and size (for ``concept_signal(..., method="autodiff")``); the data never use it.
    """
    g = jnp.linspace(-1.0, 1.0, image_size)
    px = 2.0 / (image_size - 1)
    dx, dy = g[:, None] - z[2], g[None, :] - z[3]  # [S, S]
    circle, triangle = _masks(dx, dy, z[7], px if soft_edge else 0.0)
    m = z[0] * circle + z[1] * triangle
    if blur_sigma > 0:
        m = _blur(m, blur_sigma)
    m = m[..., None]
    img = m * z[None, None, 4:7] + (1.0 - m) * z[None, None, 8:11] + pixel_noise * jax.random.normal(key, (image_size, image_size, 3))
    return jnp.clip(img, 0.0, 1.0)


def _render_batch(spec: DataSpec, z, key):
    keys = jax.random.split(key, z.shape[0])
    return jax.vmap(lambda zz, k: render(zz, k, spec.opt("image_size"), spec.opt("blur_sigma"),
                                         spec.opt("pixel_noise")))(z, keys)


def cond_keep(spec: DataSpec):
    """[11] float32: 1 where the conditioning holds an entry of a compositional, unmasked concept."""
    return jnp.asarray(spec.opt("cond_mask"), jnp.float32)


def _cond(spec: DataSpec, params, z):
    """The conditioning of concept vectors z [N, 11]: non-compositional entries zeroed, and those
    of ``data.masked`` concepts too when every example is masked (mask_prob 1; below 1 only the
    training examples ``data.dataset`` draws are)."""
    full = cond_keep(spec) + jnp.asarray(spec.opt("unmasked"), jnp.float32)
    return z * jnp.where(params["mask_prob"] >= 1, cond_keep(spec), full)[None, :]


def sample(spec: DataSpec, params, key, labels):
    """Draw z uniformly in each label's class box and render: (x [N,S,S,3], cond [N,11])."""
    k_z, k_img = jax.random.split(key)
    lo, hi = params["lo"][labels], params["hi"][labels]  # [N, 11]
    z = lo + (hi - lo) * jax.random.uniform(k_z, lo.shape)
    return _render_batch(spec, z, k_img), _cond(spec, params, z)


def corner_sample(spec: DataSpec, params, key, labels):
    """Draws at the corners of each label's class box: every entry of z (colour channels, size,
    background channels) at its box's low or high end, each chosen by a fair coin; the position
    uniform as usual. The legitimate extreme draws of a class, where a probe is weakest.
    Returns (x [N,S,S,3], cond [N,11])."""
    k_c, k_pos, k_img = jax.random.split(key, 3)
    lo, hi = params["lo"][labels], params["hi"][labels]  # [N, 11]
    z = jnp.where(jax.random.bernoulli(k_c, 0.5, lo.shape), hi, lo)
    z = z.at[:, 2:4].set(jax.random.uniform(k_pos, (labels.shape[0], 2), minval=-0.5, maxval=0.5))
    return _render_batch(spec, z, k_img), _cond(spec, params, z)


def test_sample(spec: DataSpec, params, key, labels):
    """The reference's test images of a class: colour, size and background at the class mean,
    the position random; conditioning = the class-mean prompt. (x [N,S,S,3], cond [N,11])."""
    k_pos, k_img = jax.random.split(key)
    z = class_means(spec, params)[labels]
    z = z.at[:, 2:4].set(jax.random.uniform(k_pos, (labels.shape[0], 2), minval=-0.5, maxval=0.5))
    return _render_batch(spec, z, k_img), _cond(spec, params, class_means(spec, params)[labels])


def class_means(spec: DataSpec, params):
    """z at each class's mean (position at the centre): [n_classes, 11]."""
    z = 0.5 * (params["lo"] + params["hi"])
    return z.at[:, 2:4].set(0.0)


def prompts(spec: DataSpec, params):
    return _cond(spec, params, class_means(spec, params))


def render_prompts(spec: DataSpec, params, key, n_per_class: int):
    """Images at the class means (random position): what a perfect model would draw per prompt."""
    labels = jnp.repeat(jnp.arange(spec.n_classes), n_per_class)
    z = class_means(spec, params)[labels]
    z = z.at[:, 2:4].set(jax.random.uniform(jax.random.fold_in(key, 1), (labels.shape[0], 2), minval=-0.5, maxval=0.5))
    return _render_batch(spec, z, key), labels


def concept_signal(cfg, key, n: int = 256, method: str = "difference") -> dict:
    """The signal of each concept: how much G's image changes when the concept changes value.

    "difference" (default, true to the rendered data): sigma_i = E ||G(z | concept i at its second
    value's mean) - G(z | at its first value's mean)||, the L2 distance between the two images per
    one step of the concept's value, the other entries of z (position, the other concepts,
    background) drawn from the data distribution, noise-free G with its hard mask; averaged over
    neighbouring value pairs for concepts with more than two values.
    "autodiff": E ||dG/du_i|| for u_i in [0, 1] moving the concept from the first value's mean to
    the second's, through G with a one-pixel soft edge (the hard mask has no derivative in size).

    Both grow with the separation: sigma_colour with sep_col, sigma_size with sep_size.
    """
    if method not in ("difference", "autodiff"):
        raise ValueError(f"method={method!r} is invalid: allowed difference, autodiff")
    sp = spec(cfg)
    out = _signal_program(sp, n, method)(params(cfg), key)
    return {c: float(v) for c, v in out.items()}


@functools.lru_cache(maxsize=16)
def _signal_program(sp: DataSpec, n: int, method: str):
    """``concept_signal``'s computation for data of ``sp``, jitted once: the members of a sweep
    (other separations, the same shapes) reuse it. (class boxes {lo, hi}, key) -> {concept: f32[]}."""
    size, sigma = sp.opt("image_size"), sp.opt("blur_sigma")

    def signal(p, key):
        k_lab, k_z, k_u = jax.random.split(key, 3)
        labels = jax.random.randint(k_lab, (n,), 0, sp.n_classes)
        lo, hi = p["lo"][labels], p["hi"][labels]
        z = lo + (hi - lo) * jax.random.uniform(k_z, lo.shape)
        u = jax.random.uniform(k_u, (n,))
        out = {}
        for i, (c, v) in enumerate(zip(sp.concepts, sp.values)):
            sl = SLOTS[c]
            # the mean of the concept's value k: the middle of its box, read off a class with that value
            cls = [int(np.ravel_multi_index([k if j == i else 0 for j in range(len(sp.values))], sp.values))
                   for k in range(v)]
            means = [0.5 * (p["lo"][c_k, sl] + p["hi"][c_k, sl]) for c_k in cls]
            pairs = []
            for a, b in zip(means[:-1], means[1:]):
                def g(uu, zz, a=a, b=b):
                    zz = zz.at[sl].set(a + uu * (b - a))
                    return render(zz, jax.random.PRNGKey(0), size, sigma, 0.0, soft_edge=method == "autodiff")

                if method == "difference":
                    norms = jax.vmap(lambda zz: jnp.linalg.norm(g(1.0, zz) - g(0.0, zz)))(z)
                else:
                    norms = jax.vmap(lambda uu, zz: jnp.linalg.norm(
                        jax.jvp(lambda q: g(q, zz), (uu,), (jnp.ones(()),))[1]))(u, z)
                pairs.append(jnp.mean(norms))
            out[c] = jnp.mean(jnp.stack(pairs))
        return out
    return jax.jit(signal)
