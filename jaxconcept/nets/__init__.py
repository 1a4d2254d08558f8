"""Score networks: ``build(model_cfg, spec)`` gives a U-Net for images, an MLP for vectors.

Every network is called as ``net.apply({"params": p}, x, t, cond, train, rngs={"dropout": k})``
with x [B, *x_shape], t [B] (network time in [0, 1]), cond [B, cond_dim], and returns eps_hat
[B, *x_shape] in float32. Parameters are float32; ``model_cfg.dtype`` is the compute dtype.
Named ``Tap`` points (``tap_names``) are where interventions read and edit activations.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept.nets import conv as convs
from jaxconcept.nets.layers import Tap, tap_calls
from jaxconcept.nets.mlp import MLP
from jaxconcept.nets.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(model_cfg, spec, backend: str | None = None) -> nn.Module:
    """The score network of ``model_cfg`` (a ``config.ModelConfig``) for data of ``spec``.

    Args:
      model_cfg: ``arch`` "unet" (images) or "mlp" (vectors) and its sizes; ``init_scale`` is
        applied by ``vdm.init_params``, not here. ``conv`` "auto" is resolved here, for
        ``backend`` (default: JAX's default backend; ``convs.resolve``: "explicit" on CPU, "xla"
        elsewhere).
      spec: the ``data.DataSpec``; its ``kind`` must match the architecture.
    Returns:
      An unbound Flax module.
    """
    m = model_cfg
    want = {"unet": ("images", "celeba"), "mlp": ("vector",)}[m.arch]
    if spec.kind not in want:
        raise ValueError(f"model.arch={m.arch!r} needs data.kind in {want}, got {spec.kind!r}")
    if m.arch == "mlp":
        return MLP(hidden=tuple(m.hidden), time_embed_dim=m.time_embed_dim, embed_dim=m.embed_dim,
                   dtype=DTYPES[m.dtype])
    return UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks, num_heads=m.num_heads,
                norm_groups=m.norm_groups, dropout=m.dropout, mid_attention=m.mid_attention,
                time_embed_dim=m.time_embed_dim, embed_dim=m.embed_dim, conditioning=m.conditioning,
                dtype=DTYPES[m.dtype], conv_impl=convs.resolve(m.conv, backend))


def with_dropout(net: nn.Module, rate) -> nn.Module:
    """``net`` with dropout rate ``rate`` (a float, or a traced per-member f32[] inside a stacked
    program), for a network that has dropout (the U-Net); any other network as it is."""
    return net.clone(dropout=rate) if hasattr(net, "dropout") else net


def loop_safe(model_cfg, backend: str | None = None) -> bool:
    """Whether ``model_cfg``'s network runs at full speed inside XLA loops (scan, fori_loop, map) on
    ``backend`` (default: JAX's default backend): not a U-Net with XLA's own convolutions on CPU
    (``convs.loop_safe``; its convolution gradients run 10-170x slower inside a loop,
    jax-ml/jax#12868). Decided once, where a sampler or a sweep is built, and passed down to
    ``vdm.sample`` and ``step.held_back_losses`` as a static flag and held by the ``Stack``
    (``Stack.loop_safe``, which ``Stack.steps_per_call`` reads)."""
    return model_cfg.arch != "unet" or convs.loop_safe(model_cfg.conv, backend)


def example_inputs(spec, batch: int = 1):
    """Zero (x [B, *x_shape], t [B], cond [B, cond_dim]) for initialisation and shape tracing."""
    return (jnp.zeros((batch, *spec.x_shape), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, spec.cond_dim), jnp.float32))


def tap_names(net: nn.Module, spec) -> list[str]:
    """Names (``"/".join(module.path)``) of every Tap the network calls, in call order.

    Traced with ``jax.eval_shape``: nothing is computed or initialised.
    """
    return tap_calls(lambda: net.init(jax.random.PRNGKey(0), *example_inputs(spec), False))


def param_count(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return sum(int(p.size) for p in jax.tree.leaves(params))
