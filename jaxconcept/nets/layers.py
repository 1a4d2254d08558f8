"""Layers shared by the score networks: named tap points, time embedding, conditioning MLPs."""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


class Tap(nn.Module):
    """A parameter-free identity: a named point whose output interventions may transform.

    The point's name is ``"/".join(module.path)``; see ``jaxconcept.interventions``.
    """

    @nn.compact
    def __call__(self, x):
        return x


def sinusoidal(t, dim: int, scale: float = 1000.0):
    """Sinusoidal embedding of t [B] -> [B, dim] (t scaled by ``scale`` first)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / (half - 1))
    arg = (t * scale)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class TimeEmbed(nn.Module):
    """sinusoidal(time_embed_dim) -> Dense(embed_dim) -> GELU -> Dense(embed_dim) -> GELU."""

    time_embed_dim: int
    embed_dim: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = sinusoidal(t, self.time_embed_dim).astype(self.dtype)
        h = nn.gelu(nn.Dense(self.embed_dim, dtype=self.dtype, name="dense_0")(h))
        return nn.gelu(nn.Dense(self.embed_dim, dtype=self.dtype, name="dense_1")(h))


class CondMLP(nn.Module):
    """Linear(in -> ch) -> GELU -> Linear(ch -> ch) -> GELU: one conditioning input's projection."""

    ch: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, c):
        h = nn.gelu(nn.Dense(self.ch, dtype=self.dtype, name="dense_0")(c))
        return nn.gelu(nn.Dense(self.ch, dtype=self.dtype, name="dense_1")(h))
