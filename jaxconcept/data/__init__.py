"""Data: generated images (docs/study.md A1) and vectors (docs/study.md A6), and attribute-labelled photographs
streamed from the host (CelebA, docs/study.md A5: ``celeba``), behind one interface.

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
    eval_prompts(spec, params, key, n, mode) -> cond [n_classes, n, cond_dim] for evaluation samples
    train_view(spec, x, key) -> x as the network sees a training batch (augmentation, if any)
    null_cond(spec) -> cond [cond_dim], the classifier-free-guidance "no conditioning" vector
    concept_signal(cfg, key, n) -> dict concept -> sigma_i = E||dG/dz_i||
Host-fed kinds (``HOST_FED``) add host_dtype, host_feed and host_eval_data; the order of training
batches, on the device or from the host, is ``batches.batch_indices``. Errors in the data a
config names (missing, unreadable, too small) raise ``DataError``.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


class DataError(ValueError):
    """The dataset is missing, unreadable or too small for the config: the message says what to do."""


@dataclass(frozen=True)
class DataSpec:
    """Static description shared by all members of a sweep (hashable: usable as a jit static)."""

    kind: str  # "images" | "vector" | "celeba"
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
    n_test: int = 32  # test examples per held-out class (the held-out loss)
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
    """The module of data kind ``kind``. Raises DataError for an unknown kind."""
    if kind == "images":
        from jaxconcept.data import images as m
    elif kind == "celeba":
        from jaxconcept.data import celeba as m
    elif kind == "vector":
        from jaxconcept.data import vector as m
    else:
        raise DataError(f"data.kind={kind!r} is unknown: allowed images, vector, celeba")
    return m


HOST_FED = ("celeba",)  # kinds whose training data streams from the host instead of being rendered on device


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


def corner_sample(spec: DataSpec, params, key, labels):
    """Draws at the corners of each label's class box, where a class's legitimate extreme values
    lie (``images.corner_sample``); None for kinds without a box of concept values."""
    fn = getattr(_mod(spec.kind), "corner_sample", None)
    return None if fn is None else fn(spec, params, key, labels)


def render_all(spec: DataSpec, params, key, n_per_class: int):
    labels = jnp.repeat(jnp.arange(spec.n_classes), n_per_class)
    x, cond = sample(spec, params, key, labels)
    return x, cond, labels


def mask_some(spec: DataSpec, params, cond, key):
    """Underspecification dose: each row of ``cond`` [N, cond_dim] has its ``data.masked``
    concepts zeroed with probability ``params["mask_prob"]`` (one uniform draw per row from
    ``key``; at 1 every row, as ``sample`` already does). Kinds without it return ``cond``."""
    fn = getattr(_mod(spec.kind), "cond_keep", None)
    if fn is None or "mask_prob" not in params:
        return cond
    hit = jax.random.uniform(key, (cond.shape[0], 1)) < params["mask_prob"]
    return jnp.where(hit, cond * jnp.asarray(fn(spec), cond.dtype)[None, :], cond)


def dataset(spec: DataSpec, params, key):
    """Training classes: n_train + n_val per class, shuffled, split train/validation, a
    ``data.mask_prob`` fraction of them with their ``data.masked`` concepts zeroed (``mask_some``);
    held-out classes: n_test each (x_test, c_test), never seen in training, for the held-out loss."""
    n = spec.n_train + spec.n_val
    train = jnp.asarray(spec.train_classes)
    labels = jnp.repeat(train, n)
    k_sample, k_perm, k_test = jax.random.split(key, 3)
    x, cond = sample(spec, params, k_sample, labels)
    # the split is per class so every training class has the same share in both parts
    idx = jnp.arange(len(train))[:, None] * n + jax.random.permutation(k_perm, n)[None, :]
    tr, va = idx[:, : spec.n_train].reshape(-1), idx[:, spec.n_train:].reshape(-1)
    y_test = jnp.repeat(jnp.asarray(spec.held_out, jnp.int32), spec.n_test)
    draw = getattr(_mod(spec.kind), "test_sample", sample)  # images: at the class means, as the reference
    x_test, c_test = draw(spec, params, k_test, y_test)
    cond = mask_some(spec, params, cond, jax.random.fold_in(key, 7))
    return dict(x_train=x[tr], c_train=cond[tr], y_train=labels[tr],
                x_val=x[va], c_val=cond[va], y_val=labels[va], x_test=x_test, c_test=c_test, y_test=y_test)


def eval_prompts(spec: DataSpec, params, key, n: int, mode: str = "random"):
    """Prompts of the samples drawn at evaluation: [n_classes, n, cond_dim].

    Held-out classes get their class-mean prompt (``prompts``); training classes, with mode
    "random", the conditioning of fresh draws of their class (inside its box, as the reference
    draws them), with mode "mean" their class-mean prompt too.
    """
    mean = jnp.repeat(prompts(spec, params)[:, None, :], n, axis=1)  # [n_classes, n, cond_dim]
    if mode == "mean" or spec.kind in HOST_FED:  # host-fed kinds: one-hot prompts, nothing to draw
        return mean
    labels = jnp.repeat(jnp.arange(spec.n_classes), n)
    _, cond = sample(spec, params, key, labels)
    held = jnp.isin(jnp.arange(spec.n_classes), jnp.asarray(spec.held_out, jnp.int32))[:, None, None]
    return jnp.where(held, mean, cond.reshape(spec.n_classes, n, -1))


def train_view(spec: DataSpec, x, key):
    """A batch as the network sees it (float32): host-fed kinds convert their stored dtype and,
    with a key, augment (flips, colour jitter); ``key=None`` converts only (evaluation)."""
    fn = getattr(_mod(spec.kind), "train_view", None)
    return x if fn is None else fn(spec, x, key)


def storage_tolerance(spec: DataSpec, params) -> float:
    """The largest change of a stored sample that cannot change how it is classified, for the
    float16 option of ``eval.sample_dtype``: vectors 1 % of the smallest class spread (the
    probe's finest scale: its bands are multiples of it), images half an 8-bit level."""
    if spec.kind == "vector":
        return 0.01 * float(np.min(params["std"]))
    return 0.5 / 255


# --- host-fed kinds (HOST_FED): the training set stays on the host and streams in batches ---
def host_dtype(spec: DataSpec):
    """dtype of the examples a host-fed kind sends to the device (e.g. uint8 images)."""
    return _mod(spec.kind).host_dtype(spec)


def host_feed(spec: DataSpec, members, keys):
    """For host-fed kinds: ``feed(step, k) -> {x [M, k, B, ...], c [M, k, B, cond_dim], n [M, k]}``
    (numpy), the training batches of steps step .. step+k-1 of every member, a pure function of
    (member, step) so that a resumed run sees the same batches: those ``batches.batch_indices``
    picks with the members' train keys ``keys`` [M, 2] uint32, as an on-device member's."""
    return _mod(spec.kind).host_feed(spec, members, keys)


def host_eval_data(spec: DataSpec, members) -> dict:
    """For host-fed kinds: the held-back sets kept on the device, numpy [M, N, ...]:
    x_val, c_val, x_test, c_test (x in ``host_dtype``)."""
    return _mod(spec.kind).host_eval_data(spec, members)


def concept_signal(cfg, key=None, n: int = 256, **kw) -> dict:
    """{concept: signal}: how strongly G's output changes with each concept (see each kind's
    ``concept_signal``; images: the finite difference of G between a concept's values)."""
    key = np.zeros(2, np.uint32) if key is None else key  # PRNGKey(0)'s bits, without a program to make them
    return _mod(cfg.kind).concept_signal(cfg, key, n, **kw)
