"""Score networks: ``build(model_cfg, spec)`` gives a U-Net for images, an MLP for vectors.

Every network is called as ``net.apply({"params": p}, x, t, cond, train, rngs={"dropout": k})``
and exposes named ``Tap`` points (``tap_names``) for interventions.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept.nets.layers import Tap
from jaxconcept.nets.mlp import MLP
from jaxconcept.nets.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(model_cfg, spec) -> nn.Module:
    m = model_cfg
    if m.arch == "mlp":
        return MLP(hidden=tuple(m.hidden), time_embed_dim=m.time_embed_dim, embed_dim=m.embed_dim, dtype=DTYPES[m.dtype])
    return UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks, num_heads=m.num_heads,
                norm_groups=m.norm_groups, dropout=m.dropout, mid_attention=m.mid_attention,
                time_embed_dim=m.time_embed_dim, embed_dim=m.embed_dim, conditioning=m.conditioning,
                dtype=DTYPES[m.dtype])


def example_inputs(spec, batch: int = 1):
    return (jnp.zeros((batch, *spec.x_shape)), jnp.zeros((batch,)), jnp.zeros((batch, spec.cond_dim)))


def tap_names(net: nn.Module, spec) -> list[str]:
    """Names ("/".join(module.path)) of every Tap the network calls, in call order."""
    names = []

    def record(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, Tap) and ctx.method_name == "__call__":
            names.append("/".join(ctx.module.path))
        return next_fun(*args, **kwargs)

    def run():
        with nn.intercept_methods(record):
            return net.init(jax.random.PRNGKey(0), *example_inputs(spec), False)

    jax.eval_shape(run)
    return list(dict.fromkeys(names))


def param_count(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
