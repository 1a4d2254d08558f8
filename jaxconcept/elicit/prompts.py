"""Prompt arithmetic: the prompts that push a class beyond its training range (overprompting),
the reference's fixed overprompts, and the classes that compose a held-out one.

``extrapolate`` is the one rule, c + s (c - c_ref), that the toy models' overprompts and Stable
Diffusion's text conditionings (``sd.overprompt``) share; ``reference_class`` is the one
reference: the class with the pushed concept at value 0.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxconcept import data as D
from jaxconcept.data.images import SLOTS


def extrapolate(c, c_ref, s):
    """c + s (c - c_ref) for each strength (overprompting, docs/study.md A4): c, c_ref [*shape], s [S] ->
    [S, *shape]."""
    s = jnp.asarray(s)
    return c[None] + s.reshape(-1, *([1] * jnp.ndim(c))) * (c - c_ref)[None]


def reference_class(spec, cls: int, concept: int) -> int:
    """The class that differs from ``cls`` only in concept ``concept``, which it has at value 0:
    the reference that overprompting pushes away from."""
    vals = list(spec.class_values(cls))
    vals[concept] = 0
    return int(np.ravel_multi_index(vals, spec.values))


def composition_classes(spec, cls: int, concept: int):
    """(a, b, c) training classes whose projections compose class ``cls`` along ``concept``:
    a = ``cls`` with ``concept`` at value 0; b = every other concept at 0, ``concept`` at cls's
    value; c = class 0. None when one of them is not a training class (or ``cls`` is one of them)."""
    vals = list(spec.class_values(cls))
    b = [0] * len(vals)
    b[concept] = vals[concept]
    out = (reference_class(spec, cls, concept), int(np.ravel_multi_index(b, spec.values)), 0)
    return out if all(k in spec.train_classes for k in out) and cls not in out else None


# The reference's overprompting (scripts/get_capability.py): these colours for the held-out
# blue-small at every sep_col, with size 0.3, the rest of the prompt zero.
REFERENCE_COLOURS = ((0.4, 0.4, 0.6), (0.35, 0.35, 0.65), (0.25, 0.25, 0.75), (0.15, 0.15, 0.85), (0.05, 0.05, 0.95))
REFERENCE_SIZE = 0.3


def reference_overprompts(spec, params, cls: int):
    """The reference's fixed overprompts of image class ``cls``: its prompt with the colour set to
    each of ``REFERENCE_COLOURS`` and the size to ``REFERENCE_SIZE`` (where the prompt holds them:
    a masked concept stays zero). Returns [5, cond_dim], or None for data without a colour concept."""
    if spec.kind != "images" or "colour" not in spec.concepts:
        return None
    p = jnp.repeat(D.prompts(spec, params)[cls][None], len(REFERENCE_COLOURS), 0)
    col, size = SLOTS["colour"], SLOTS["size"]
    held = p[0]
    if bool(jnp.any(held[col] != 0)):
        p = p.at[:, col].set(jnp.asarray(REFERENCE_COLOURS, jnp.float32))
    if "size" in spec.concepts and bool(jnp.any(held[size] != 0)):
        p = p.at[:, size].set(REFERENCE_SIZE)
    return p


def overprompts(spec, params, cls: int, concept: int, strengths):
    """Prompts for class ``cls`` pushed beyond the training range along concept ``concept``.

    Images, colour: each channel c -> 0.5 + (c - 0.5)(1 + s) (for sep_col 0.2 and s in
    0, 0.5, 1.5, 2.5, 3.5 this gives docs/study.md A4's (0.4,0.4,0.6) ... (0.05,0.05,0.95)); other concepts
    and vectors: ``extrapolate`` from p_ref, the prompt of ``reference_class``. Image prompts are clipped to [0, 1]. Returns [S, cond_dim].
    """
    pr = D.prompts(spec, params)
    s = jnp.asarray(strengths, jnp.float32)
    out = extrapolate(pr[cls], pr[reference_class(spec, cls, concept)], s)
    if spec.kind == "images":
        p, s = pr[cls][None, :], s[:, None]
        if spec.concepts[concept] == "colour":
            sl = SLOTS["colour"]
            col = 0.5 + (p[:, sl] - 0.5) * (1 + s)
            out = out.at[:, sl].set(col)
        return jnp.clip(out, 0.0, 1.0)
    return out
