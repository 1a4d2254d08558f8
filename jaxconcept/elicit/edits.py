"""Interventions: pure transforms of named activations (``Tap`` outputs) during ``apply``, and the
latent steering and composition edits built from them (prompt arithmetic is ``prompts``).

An ``Edit`` names a tap point and an operation; its ``value`` and ``strength`` are arrays (pytree
leaves), so ``jit``/``vmap`` sweep over them without recompiling. ``intervene(net, edits)``
returns an apply_fn with the signature of ``vdm.make_apply(net)``; it enters
``nn.intercept_methods`` *inside* the traced function, so it works under jit, vmap and inside the
jitted sampler (an interceptor entered outside a jitted function would be silently ignored).

    edit = Edit("down_0_block_0/cond_c", "add", value=direction, strength=alpha)
    x = vdm.sample(intervene(net, [edit]), model_cfg, params, cond, key, ...)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import struct

from jaxconcept.nets import tap_names
from jaxconcept.nets.layers import Tap

OPS = ("replace", "add", "scale", "steer", "project_out")


@struct.dataclass
class Edit:
    """One transform of the activation h at tap ``point``:

    replace:     (1 - s) h + s v            (s = 1: h := v; v may be another prompt's activation)
    add:         h + s v
    scale:       s h
    steer:       h + s v / |v|              (along a direction, unit length)
    project_out: h - s (h . u) u, u = v/|v| (s = 1 removes the component along v)
    """

    point: str = struct.field(pytree_node=False)
    op: str = struct.field(pytree_node=False)
    value: Any = 0.0
    strength: Any = 1.0


def _unit(v):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def apply_edit(e: Edit, h):
    v = jnp.broadcast_to(jnp.asarray(e.value, h.dtype), h.shape)  # e.g. a direction [ch] for [B, ch]
    s = jnp.asarray(e.strength, h.dtype)
    if e.op == "replace":
        return (1 - s) * h + s * v
    if e.op == "add":
        return h + s * v
    if e.op == "scale":
        return s * h
    if e.op == "steer":
        return h + s * _unit(v)
    u = _unit(v)
    return h - s * jnp.sum(h * u, axis=-1, keepdims=True) * u


def check(net, spec, edits) -> None:
    """Raise ValueError for an unknown point or operation, listing what is valid."""
    check_points(edits, tap_names(net, spec))


def check_points(edits, valid) -> None:
    """Raise ValueError for an operation not in OPS or a point not in ``valid``, listing what is."""
    for e in edits:
        if e.op not in OPS:
            raise ValueError(f"intervention op {e.op!r} is unknown: allowed {', '.join(OPS)}")
        if e.point not in valid:
            raise ValueError(f"intervention point {e.point!r} does not exist: valid points are {', '.join(valid)}")


def _interceptor(edits, captured=None, capture_points=()):
    def fn(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if isinstance(ctx.module, Tap) and ctx.method_name == "__call__":
            name = "/".join(ctx.module.path)
            for e in edits:
                if e.point == name:
                    out = apply_edit(e, out)
            if captured is not None and name in capture_points:
                captured[name] = out
        return out
    return fn


def applying(edits, captured: dict | None = None, points=()):
    """A context in which every ``Tap`` output passes ``edits`` (in order) and the outputs at
    ``points`` are stored in ``captured``. Enter it *inside* the traced function, around any
    ``apply`` of any network with taps (the UNet here, Stable Diffusion in ``jaxconcept.sd``)."""
    return nn.intercept_methods(_interceptor(list(edits), captured, tuple(points)))


def intervene(net, edits, spec=None):
    """An apply_fn(net_params, x, t, cond, train, key) that applies ``edits`` in order.

    With ``spec`` given, the points are checked first (clear error naming the valid points).
    """
    edits = list(edits)
    if spec is not None:
        check(net, spec, edits)

    def apply_fn(net_params, x, t, cond, train, key):
        with applying(edits):
            return net.apply({"params": net_params}, x, t, cond, train, rngs={"dropout": key})
    return apply_fn


def capture(net, net_params, x, t, cond, points, edits=()) -> dict:
    """Activations at ``points`` (after any ``edits``) for the given inputs: {name: array}."""
    captured = {}
    with applying(edits, captured, points):
        net.apply({"params": net_params}, x, t, cond, False)
    missing = [p for p in points if p not in captured]
    if missing:
        raise ValueError(f"no activation captured at {missing}")
    return dict(captured)


def cond_points(net, spec) -> list[str]:
    """The concept-vector projections: tap points whose name ends in 'cond_c'."""
    return [n for n in tap_names(net, spec) if n.endswith("cond_c")]


def steering_edits(net, spec, net_params, cond_from, cond_to, strength, op="add") -> list[Edit]:
    """Edits adding ``strength`` x (activation(cond_to) - activation(cond_from)) at every concept
    projection. The cond_c activations depend on the conditioning only, so any x, t will do."""
    points = cond_points(net, spec)
    x = jnp.zeros((2, *spec.x_shape))
    acts = capture(net, net_params, x, jnp.zeros((2,)), jnp.stack([cond_from, cond_to]), points)
    return [Edit(p, op, value=acts[p][1] - acts[p][0], strength=strength) for p in points]


def compositional_edits(net, spec, net_params, cond_a, cond_b, cond_c, strength) -> list[Edit]:
    """Edits that set every concept projection h to h(a) + ``strength`` x (h(b) - h(c)).

    Built from training classes only: for the held-out blue-small, a = red-small, b = blue-large,
    c = red-large (h(red-small) + [h(blue-large) - h(red-large)], issue 34), so the held-out prompt
    never enters: sample with ``cond_a`` as the conditioning. With projections linear in the
    conditioning and strength 1 this is h(a + b - c) = h(held-out prompt) for prompts at the class
    means. ``strength`` may be a traced scalar (vmap over strengths)."""
    points = cond_points(net, spec)
    x = jnp.zeros((3, *spec.x_shape))
    acts = capture(net, net_params, x, jnp.zeros((3,)), jnp.stack([cond_a, cond_b, cond_c]), points)
    return [Edit(p, "replace", value=acts[p][0] + strength * (acts[p][1] - acts[p][2])) for p in points]
