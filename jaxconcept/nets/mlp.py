"""MLP score network for vector concept spaces (docs/study.md A6), laid out as the reference's ``CMLP``."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxconcept.nets.layers import CondMLP, Tap, TimeEmbed, dense, gelu


class HiddenLayer(nn.Module):
    """h' = GELU(Linear(h) + emb_t(temb) + emb_c(cond)), each embedder Linear-GELU-Linear-GELU.

    Taps: ``cond_t``, ``cond_c`` (the projections, [B, width]) and ``out``.
    """

    width: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, h, temb, cond):
        h = dense(self.width, h.shape[-1], dtype=self.dtype, name="dense")(h)  # [B, width]
        h = h + Tap(name="cond_t")(CondMLP(self.width, self.dtype, name="emb_t")(temb))
        h = h + Tap(name="cond_c")(CondMLP(self.width, self.dtype, name="emb_c")(cond))
        return Tap(name="out")(gelu(h))


class MLP(nn.Module):
    """eps_hat = x + Linear(h_L), h_l = layer_l(h_{l-1}) (see ``HiddenLayer``), h_0 = x.

    The time embedding is sinusoidal -> Linear -> GELU -> Linear (no final GELU, as in the
    reference); the concept vector goes raw to every layer's embedder. Submodule names:
    time_embed, layer_{l} (taps ``layer_{l}/cond_t``, ``layer_{l}/cond_c``, ``layer_{l}/out``), dense_out.
    """

    hidden: tuple = (1024,)
    time_embed_dim: int = 64
    embed_dim: int = 256
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, t, cond, train: bool = False):
        b, d = x.shape  # [B, D]
        assert t.shape == (b,) and cond.shape[0] == b, (x.shape, t.shape, cond.shape)
        temb = TimeEmbed(self.time_embed_dim, self.embed_dim, final_gelu=False, dtype=self.dtype,
                         name="time_embed")(t)  # [B, embed_dim]
        c = cond.astype(self.dtype)  # [B, cond_dim]
        h = x.astype(self.dtype)
        for i, width in enumerate(self.hidden):
            h = HiddenLayer(width, self.dtype, name=f"layer_{i}")(h, temb, c)  # [B, width]
        out = dense(d, h.shape[-1], dtype=self.dtype, name="dense_out")(h)  # [B, D]
        return x.astype(jnp.float32) + out.astype(jnp.float32)
