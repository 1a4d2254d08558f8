"""Layers shared by the score networks: named tap points, time embedding, conditioning MLPs, and
Dense/Conv constructors initialised as the reference's PyTorch layers are.

PyTorch's default ``Linear``/``Conv`` init draws kernel and bias from U(-1/sqrt(fan_in),
1/sqrt(fan_in)); Flax's default is lecun-normal kernels and zero biases (a kernel about sqrt(3)
larger). The reference's learning dynamics are what we reproduce, so we use its init.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept.nets import conv as convs

zeros = nn.initializers.zeros


def gelu(x):
    """Exact (erf) GELU, PyTorch's ``nn.GELU()`` default; Flax's default is the tanh approximation."""
    return nn.gelu(x, approximate=False)


class Tap(nn.Module):
    """A parameter-free identity: a named point whose output interventions may transform.

    The point's name is ``"/".join(module.path)``; see ``jaxconcept.interventions``.
    """

    @nn.compact
    def __call__(self, x):
        return x


def torch_uniform(fan_in: int):
    """Initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for kernels and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def dense(features: int, fan_in: int, *, name: str, dtype, zero: bool = False) -> nn.Dense:
    """A Dense layer with PyTorch's default init (all-zero with ``zero``)."""
    init = zeros if zero else torch_uniform(fan_in)
    return nn.Dense(features, kernel_init=init, bias_init=init, dtype=dtype, name=name)


def conv(features: int, in_ch: int, k: int, *, name: str, dtype, stride: int = 1, zero: bool = False,
         impl: str = "xla") -> nn.Module:
    """A k x k convolution with PyTorch's default init (fan_in = in_ch k^2); 'SAME' padding when
    stride is 1 (the reference pads k // 2), 'VALID' for the strided downsampling conv.
    ``impl``: the formulation, "xla" or "explicit" (``jaxconcept.nets.conv``)."""
    init = zeros if zero else torch_uniform(in_ch * k * k)
    return convs.make(impl, features, k, stride=stride, transpose=False, init=init, name=name, dtype=dtype)


def conv_transpose(features: int, k: int, *, name: str, dtype, impl: str = "xla") -> nn.Module:
    """A stride-k k x k transposed convolution (upsampling). PyTorch computes a transposed conv's
    fan_in from its *output* channels (its weight is [in, out, k, k]), and so do we."""
    return convs.make(impl, features, k, stride=k, transpose=True, init=torch_uniform(features * k * k), name=name,
                  dtype=dtype)


def sinusoidal(t, dim: int, scale: float = 1000.0):
    """Sinusoidal embedding of t [B] -> [B, dim]: [sin, cos] of (scale t) at frequencies
    10000^(-i / (dim/2 - 1)), i = 0 .. dim/2 - 1 (the VDM convention the reference follows)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / max(half - 1, 1))  # [dim/2]
    arg = (t.astype(jnp.float32) * scale)[:, None] * freqs[None, :]  # [B, dim/2]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class TimeEmbed(nn.Module):
    """sinusoidal(time_embed_dim) -> Linear(embed_dim) -> GELU -> Linear(embed_dim) [-> GELU].

    The U-Net's embedder ends with a GELU, the MLP's does not (as in the reference).
    """

    time_embed_dim: int
    embed_dim: int
    final_gelu: bool = True
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = sinusoidal(t, self.time_embed_dim).astype(self.dtype)  # [B, time_embed_dim]
        h = gelu(dense(self.embed_dim, self.time_embed_dim, dtype=self.dtype, name="dense_0")(h))
        h = dense(self.embed_dim, self.embed_dim, dtype=self.dtype, name="dense_1")(h)
        return gelu(h) if self.final_gelu else h  # [B, embed_dim]


class CondMLP(nn.Module):
    """Linear(in -> ch) -> GELU -> Linear(ch -> ch) -> GELU: one conditioning input's embedder."""

    ch: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, c):
        h = gelu(dense(self.ch, c.shape[-1], dtype=self.dtype, name="dense_0")(c))
        return gelu(dense(self.ch, self.ch, dtype=self.dtype, name="dense_1")(h))  # [B, ch]
