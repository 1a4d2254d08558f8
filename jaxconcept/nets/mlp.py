"""MLP score network for vector concept spaces (SPEC A6)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxconcept.nets.layers import CondMLP, Tap, TimeEmbed


class MLP(nn.Module):
    """eps_hat = x + Dense(h_L), h_l = GELU(Dense(h_{l-1}) + proj_t,l(temb) + proj_c,l(cond)).

    Tap points per hidden layer l: ``layer_l/cond_t``, ``layer_l/cond_c`` ([B, width]) and
    ``layer_l/out``.
    """

    hidden: tuple = (1024,)
    time_embed_dim: int = 64
    embed_dim: int = 256
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, t, cond, train: bool = False):
        b, d = x.shape  # [B, D]
        temb = TimeEmbed(self.time_embed_dim, self.embed_dim, self.dtype, name="time_embed")(t)
        h = x.astype(self.dtype)
        for i, width in enumerate(self.hidden):
            h = nn.Dense(width, dtype=self.dtype, name=f"layer_{i}_dense")(h)
            h = h + Tap(name=f"layer_{i}_cond_t")(CondMLP(width, self.dtype, name=f"layer_{i}_emb_t")(temb))
            h = h + Tap(name=f"layer_{i}_cond_c")(CondMLP(width, self.dtype, name=f"layer_{i}_emb_c")(cond.astype(self.dtype)))
            h = Tap(name=f"layer_{i}_out")(nn.gelu(h))
        out = nn.Dense(d, dtype=self.dtype, name="out")(h)
        assert out.shape == (b, d)
        return (x + out).astype(jnp.float32)
