"""Vector concept spaces (docs/study.md A6): Gaussian classes on a grid, plus nuisance dimensions.

A vector is ``[concept coordinates (dim) | nuisance coordinates (dim_nuisance)]``. Concept
dimension i takes ``perdim`` values; class c sits at the grid point of its row-major index tuple
(like the image classes) and draws an isotropic Gaussian around it:

    x_i = u_i * step_i + std_i * N(0, 1),     u_i = value index of concept i (0 .. perdim-1)
    step_i = m_i,  std_i = s_i                 without normalisation
    step_i = 1/(perdim-1),  std_i = s_i / ((perdim-1) m_i)   with ``normalize`` (unit range)

Nuisance dimensions carry no class information: "gaussian" draws N(0, 1); "bimodal" draws one
of the 2**dim_nuisance corners of {-1, +1}^dim_nuisance plus N(0, 0.1^2). The corner of example
j is ``(j + r) mod 2**dim_nuisance`` for one random offset r per call, so every corner occurs
equally often (to within one) in any call, and per class in ``data.dataset`` when the per-class
count is a multiple of 2**dim_nuisance, as in the reference, which tiles the corners.

Conditioning (``cond_mode``): "classy" = per-dimension one-hot, concatenated (dim*perdim);
"mean" = the class mean (dim); "observed" = the sample's own concept coordinates plus
N(0, cond_noise^2) (dim). Entries of ``masked`` concepts are zero (in a ``mask_prob`` fraction
of the training examples; below 1 prompts keep them).

Per-member arrays (``params``): ``mean`` [n_classes, dim], ``std`` [dim], ``step`` [dim] and
``cond_noise`` [] — the same shapes for every m, s and cond_noise, so a stack of members vmaps.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.config.rules import default_train_classes
from jaxconcept.data import DataSpec

NUISANCE_STD = 0.1  # spread of each bimodal nuisance mode (docs/study.md A6)


# --------------------------------------------------------------------------------------------
# Static description
# --------------------------------------------------------------------------------------------
def _grid(dim: int, perdim: int) -> np.ndarray:
    """Value indices of every class, row-major: [n_classes, dim] int."""
    return np.array(list(itertools.product(range(perdim), repeat=dim)), np.int32).reshape(-1, dim)


def split_sizes(n_per_class: int, val_frac: float) -> tuple:
    """(n_train, n_val) per training class: ``n_per_class`` training examples (the reference's
    1024 per class, docs/study.md A6) plus ``val_frac * n_per_class`` validation examples drawn alongside
    (at least one: the validation loss needs one), as the reference drew a separate test set."""
    return n_per_class, max(1, int(round(n_per_class * val_frac)))


def spec(cfg) -> DataSpec:
    """Static description of vector data from a ``DataConfig`` with ``kind="vector"``.

    Args:
        cfg: the data config (a sweep member or the sweep config: m and s are not used here).
    Returns:
        DataSpec with x_shape (dim + dim_nuisance,), concepts ("dim0", ...), and ``extra`` holding
        dim, perdim, normalize, dim_nuisance, nuisance, cond_mode, masked.
    """
    d, k = cfg.dim, cfg.perdim
    n_classes = k ** d
    train = tuple(dict.fromkeys(cfg.train_classes)) if cfg.train_classes else default_train_classes(d, k)
    held = tuple(cfg.held_out) if cfg.held_out else tuple(c for c in range(n_classes) if c not in train)
    train = tuple(c for c in train if c not in held)
    if not train:
        raise ValueError(f"no training class left: train_classes={train} held_out={held}")
    concepts = tuple(f"dim{i}" for i in range(d))
    cond_dim = d * k if cfg.cond_mode == "classy" else d
    n_train, n_val = split_sizes(cfg.n_per_class, cfg.val_frac)
    extra = (("dim", d), ("perdim", k), ("normalize", bool(cfg.normalize)),
             ("dim_nuisance", cfg.dim_nuisance), ("nuisance", cfg.nuisance), ("cond_mode", cfg.cond_mode),
             ("masked", tuple(cfg.masked)))
    return DataSpec(
        kind="vector", x_shape=(d + cfg.dim_nuisance,), cond_dim=cond_dim, n_classes=n_classes,
        concepts=concepts, values=(k,) * d, value_names=tuple(tuple(str(j) for j in range(k)) for _ in concepts),
        class_names=tuple("-".join(str(int(v)) for v in g) for g in _grid(d, k)),
        train_classes=train, held_out=held, n_train=n_train, n_val=n_val, n_test=cfg.n_test, extra=extra)


def cond_keep(spec: DataSpec) -> np.ndarray:
    """1 where a conditioning entry is kept, 0 for masked concepts: [cond_dim] float32."""
    per = spec.opt("perdim") if spec.opt("cond_mode") == "classy" else 1
    keep = np.array([c not in spec.opt("masked") for c in spec.concepts], np.float32)
    return np.repeat(keep, per)


def _mask(spec: DataSpec, params):
    """The mask of prompts and drawn examples: ``cond_keep`` when every example is masked
    (mask_prob 1), else all ones (``data.dataset`` masks the training examples it draws)."""
    return jnp.where(params["mask_prob"] >= 1, jnp.asarray(cond_keep(spec)), 1.0)


# --------------------------------------------------------------------------------------------
# Per-member arrays
# --------------------------------------------------------------------------------------------
def params(cfg) -> dict:
    """Per-member arrays (everything a sweep varies), same shapes for every m and s.

    Args:
        cfg: a data config whose ``m`` and ``s`` are flat (one member; see ``config.members``).
    Returns:
        {"mean": [n_classes, dim], "std": [dim], "step": [dim], "cond_noise": [], "mask_prob": []} float32
        (numpy): class means, per-dimension spread, the distance between neighbouring values of each
        concept, the std of the noise of "observed" conditioning, and the fraction of training
        examples whose masked concepts are masked.
    """
    m, s = np.asarray(cfg.m, np.float64), np.asarray(cfg.s, np.float64)
    if m.shape != (cfg.dim,) or s.shape != (cfg.dim,):
        raise ValueError(f"data.m={cfg.m!r}, data.s={cfg.s!r}: expected {cfg.dim} numbers each "
                         "(expand a sweep with config.members first)")
    extent = (cfg.perdim - 1) * m if cfg.normalize else np.ones_like(m)  # each concept spans [0, 1]
    step, std = m / extent, s / extent
    mean = _grid(cfg.dim, cfg.perdim) * step[None, :]
    return {"mean": mean.astype(np.float32), "std": std.astype(np.float32), "step": step.astype(np.float32),
            "cond_noise": np.float32(cfg.cond_noise), "mask_prob": np.float32(cfg.mask_prob)}


def class_means(spec: DataSpec, params) -> jax.Array:
    """Class means in data space: [n_classes, dim] (concept dimensions only)."""
    return params["mean"]


def class_std(spec: DataSpec, params) -> jax.Array:
    """Per-concept-dimension standard deviation of every class: [dim]."""
    return params["std"]


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------
def generate(params, u, eps, nuisance):
    """G: concept coordinates and noise to a data vector, differentiable in ``u``.

    Args:
        params: per-member arrays from ``params``.
        u: [N, dim] concept coordinates in value steps (class value indices; continuous allowed).
        eps: [N, dim] standard normal noise of the concept dimensions.
        nuisance: [N, dim_nuisance] nuisance coordinates.
    Returns:
        x: [N, dim + dim_nuisance].
    """
    z = u * params["step"][None, :] + eps * params["std"][None, :]  # [N, dim]
    return jnp.concatenate([z, nuisance.astype(z.dtype)], axis=-1)


def _nuisance(spec: DataSpec, key, n: int):
    """[n, dim_nuisance] nuisance coordinates (see the module docstring for "bimodal")."""
    k = spec.opt("dim_nuisance")
    k_noise, k_off = jax.random.split(key)
    noise = jax.random.normal(k_noise, (n, k), jnp.float32)
    if spec.opt("nuisance") == "gaussian":
        return noise
    corner = (jnp.arange(n) + jax.random.randint(k_off, (), 0, 2 ** k)) % (2 ** k)  # [n]
    bits = jnp.right_shift(corner[:, None], jnp.arange(k - 1, -1, -1)[None, :]) & 1  # [n, k], MSB first
    return (2 * bits - 1).astype(jnp.float32) + NUISANCE_STD * noise


def _onehot(spec: DataSpec, idx):
    """[N, dim] value indices -> [N, dim*perdim] per-dimension one-hot, concatenated."""
    oh = jax.nn.one_hot(idx, spec.opt("perdim"), dtype=jnp.float32)  # [N, dim, perdim]
    return oh.reshape(idx.shape[0], idx.shape[1] * spec.opt("perdim"))  # explicit: N may be 0


def sample(spec: DataSpec, params, key, labels):
    """Draw one example per label.

    Args:
        spec: from ``spec``; params: from ``params`` (one member).
        key: PRNG key. labels: [N] int class indices (any class, held-out included).
    Returns:
        x [N, dim + dim_nuisance] float32, cond [N, cond_dim] float32.
    """
    n, d = labels.shape[0], spec.opt("dim")
    k_eps, k_nuis, k_cond = jax.random.split(key, 3)
    idx = jnp.asarray(_grid(d, spec.opt("perdim")))[labels]  # [N, dim] value indices
    eps = jax.random.normal(k_eps, (n, d), jnp.float32)
    x = generate(params, idx.astype(jnp.float32), eps, _nuisance(spec, k_nuis, n))
    mode = spec.opt("cond_mode")
    if mode == "classy":
        cond = _onehot(spec, idx)
    elif mode == "mean":
        cond = params["mean"][labels]
    else:  # "observed": the example's own concept coordinates, seen through noise
        cond = x[:, :d] + params["cond_noise"] * jax.random.normal(k_cond, (n, d), jnp.float32)
    return x, cond * _mask(spec, params)[None, :]


def prompts(spec: DataSpec, params):
    """Conditioning at the class means: [n_classes, cond_dim] (one-hot for "classy", else the
    class mean — also for "observed", whose noise-free value at the mean is the mean)."""
    if spec.opt("cond_mode") == "classy":
        cond = _onehot(spec, jnp.asarray(_grid(spec.opt("dim"), spec.opt("perdim"))))
    else:
        cond = params["mean"]
    return cond * _mask(spec, params)[None, :]


def concept_signal(cfg, key, n: int = 256) -> dict:
    """Signal of each concept: sigma_i = E||dG/du_i|| / std_i, a dimensionless ratio.

    u_i is the concept coordinate in value steps (one step = moving to the neighbouring value),
    so the numerator is the data-space distance between neighbouring class means, measured with
    ``jax.jvp`` through ``generate`` at n random examples; dividing by the spread along that
    dimension makes it a signal-to-spread ratio, m_i / s_i, whether or not ``normalize`` is set
    (both numerator and spread are divided by the same extent).

    Args:
        cfg: one member's data config. key: PRNG key. n: examples to average over.
    Returns:
        {"dim0": float, ...}.
    """
    sp = spec(cfg)
    return {k: float(v) for k, v in _signal_program(sp, n)(params(cfg), key).items()}


@functools.lru_cache(maxsize=16)
def _signal_program(sp: DataSpec, n: int):
    """``concept_signal``'s computation for data of ``sp``, jitted once: the members of a sweep
    (other m and s, the same shapes) reuse it. (params, key) -> {concept: f32[]}."""
    d = sp.opt("dim")
    grid = _grid(d, sp.opt("perdim"))

    def signal(p, key):
        k_lab, k_x = jax.random.split(key)
        labels = jax.random.randint(k_lab, (n,), 0, sp.n_classes)
        u = jnp.asarray(grid)[labels].astype(jnp.float32)  # [n, dim]
        k_eps, k_nuis = jax.random.split(k_x)
        eps = jax.random.normal(k_eps, (n, d), jnp.float32)
        nuis = _nuisance(sp, k_nuis, n)
        out = {}
        for i, name in enumerate(sp.concepts):
            tangent = jnp.zeros_like(u).at[:, i].set(1.0)
            _, dx = jax.jvp(lambda uu: generate(p, uu, eps, nuis), (u,), (tangent,))  # [n, D]
            out[name] = jnp.mean(jnp.linalg.norm(dx, axis=-1)) / p["std"][i]
        return out
    return jax.jit(signal)
