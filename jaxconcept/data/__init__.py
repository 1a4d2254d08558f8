"""Data-generating processes: images (SPEC A1) and vectors (SPEC A6), behind one interface.

Everything a sweep varies (separations, spreads) lives in ``params(cfg)``, a pytree of arrays
with the same shapes for every member, so datasets for a stack of configs render in one
``vmap``. Everything that fixes shapes lives in the hashable ``DataSpec``.

Interface (dispatching on ``spec.kind``):
    spec(cfg) -> DataSpec
    params(cfg) -> pytree of arrays
    sample(spec, params, key, labels) -> (x [N, *x_shape], cond [N, cond_dim])
    dataset(spec, params, key) -> dict(x_train, c_train, y_train, x_val, c_val, y_val)
    render_all(spec, params, key, n_per_class) -> (x, cond, labels), every class incl. held-out
    prompts(spec, params) -> cond [n_classes, cond_dim] at the class means
    null_cond(spec) -> cond [cond_dim], the classifier-free-guidance "no conditioning" vector
    concept_signal(cfg, key, n) -> dict concept -> sigma_i = E||dG/dz_i||
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class DataSpec:
    """Static description shared by all members of a sweep (hashable: usable as a jit static)."""

    kind: str  # "images" | "vector"
    x_shape: tuple  # (H, W, 3) or (d + dim_nuisance,)
    cond_dim: int
    n_classes: int
    concepts: tuple  # concept names, e.g. ("colour", "size")
    values: tuple  # number of values per concept
    value_names: tuple  # per concept, a name per value, e.g. (("red", "blue"), ("large", "small"))
    class_names: tuple  # e.g. ("red-large", "red-small", "blue-large", "blue-small")
    train_classes: tuple
    held_out: tuple
    n_train: int  # training examples per training class
    n_val: int  # validation examples per training class
    extra: tuple = ()  # kind-specific static settings as (key, value) pairs

    def class_values(self, c: int) -> tuple:
        """Per-concept value indices of class ``c`` (row-major over the concepts)."""
        out = []
        for v in reversed(self.values):
            out.append(c % v)
            c //= v
        return tuple(reversed(out))

    def opt(self, key, default=None):
        return dict(self.extra).get(key, default)


def _mod(kind):
    if kind == "images":
        from jaxconcept.data import images as m
    else:
        from jaxconcept.data import vector as m
    return m


def spec(cfg) -> DataSpec:
    return _mod(cfg.kind).spec(cfg)


def params(cfg):
    return _mod(cfg.kind).params(cfg)


def sample(spec: DataSpec, params, key, labels):
    return _mod(spec.kind).sample(spec, params, key, labels)


def prompts(spec: DataSpec, params):
    return _mod(spec.kind).prompts(spec, params)


def null_cond(spec: DataSpec):
    return -jnp.ones((spec.cond_dim,), jnp.float32)


def render_all(spec: DataSpec, params, key, n_per_class: int):
    labels = jnp.repeat(jnp.arange(spec.n_classes), n_per_class)
    x, cond = sample(spec, params, key, labels)
    return x, cond, labels


def dataset(spec: DataSpec, params, key):
    """Training classes only: n_train + n_val per class, shuffled, split train/validation."""
    n = spec.n_train + spec.n_val
    train = jnp.asarray(spec.train_classes)
    labels = jnp.repeat(train, n)
    k_sample, k_perm = jax.random.split(key)
    x, cond = sample(spec, params, k_sample, labels)
    # the split is per class so every training class has the same share in both parts
    idx = jnp.arange(len(train))[:, None] * n + jax.random.permutation(k_perm, n)[None, :]
    tr, va = idx[:, : spec.n_train].reshape(-1), idx[:, spec.n_train:].reshape(-1)
    return dict(x_train=x[tr], c_train=cond[tr], y_train=labels[tr],
                x_val=x[va], c_val=cond[va], y_val=labels[va])


def concept_signal(cfg, key=None, n: int = 256) -> dict:
    return _mod(cfg.kind).concept_signal(cfg, key if key is not None else jax.random.PRNGKey(0), n)
