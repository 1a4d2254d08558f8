"""Building blocks shared by SD's UNet and VAE decoder, named as diffusers names them.

Module names mirror the diffusers/transformers parameter names with ``.N`` written ``_N``
(``resnets.0.conv1`` is our ``resnets_0/conv1``), so ``weights.py`` maps one onto the other by a
rule instead of a table. Images are NHWC here (PyTorch's are NCHW).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept.nets.layers import Tap


def conv(features: int, *, name: str, dtype, k: int = 3, stride: int = 1) -> nn.Conv:
    """A k x k convolution padded by k // 2 on every side (PyTorch's ``padding=k//2``)."""
    p = k // 2
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), dtype=dtype, name=name)


def group_norm(groups: int, eps: float, *, name: str, dtype) -> nn.GroupNorm:
    """GroupNorm with an affine scale and offset (statistics in float32 whatever ``dtype``)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def attend(q, k, v, heads: int, causal: bool = False):
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v, per head.

    Args:
      q: [B, T, heads * d]; k, v: [B, S, heads * d].
      causal: position i attends to positions <= i only (CLIP's text transformer).
    Returns:
      [B, T, heads * d] in q's dtype; logits and softmax in float32 (Vaswani et al. 2017 eq. 1).
    """
    b, t, inner = q.shape
    d = inner // heads
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d)  # noqa: E731
    logits = jnp.einsum("bthd,bshd->bhts", split(q), split(k), preferred_element_type=jnp.float32) / jnp.sqrt(d)
    if causal:
        keep = jnp.tril(jnp.ones((t, k.shape[1]), bool))  # [T, S]
        logits = jnp.where(keep[None, None], logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1).astype(q.dtype)  # [B, heads, T, S]
    return jnp.einsum("bhts,bshd->bthd", w, split(v)).reshape(b, t, inner)


class Attention(nn.Module):
    """diffusers' ``Attention``: to_q, to_k, to_v, softmax attention, to_out_0.

    Self-attention when ``cross`` is False; otherwise keys and values come from ``context``,
    which first passes the tap point ``context`` (the cross-attention's input: the text
    conditioning as this layer sees it). ``qkv_bias``: the VAE's attention has biases on q, k, v,
    the UNet's does not. ``groups`` > 0 (the VAE's): x is an image [B, H, W, C], normalised by
    ``group_norm`` (eps 1e-6), attended over its pixels, and added back (residual).
    """

    heads: int
    dim_head: int
    cross: bool = False
    qkv_bias: bool = False
    groups: int = 0
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        image = x
        if self.groups:
            b, hh, ww, c = x.shape
            x = group_norm(self.groups, 1e-6, name="group_norm", dtype=self.dtype)(x).reshape(b, hh * ww, c)
        inner = self.heads * self.dim_head
        dense = lambda name: nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)  # noqa: E731
        src = Tap(name="context")(context) if self.cross else x  # [B, S, C_ctx] or [B, T, C]
        a = attend(dense("to_q")(x), dense("to_k")(src), dense("to_v")(src), self.heads)
        out = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(a)  # [B, T, C]
        return image + out.reshape(image.shape) if self.groups else out


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` (He et al. 2016 with GroupNorm and SiLU):
    GN-SiLU-conv1, + time_emb_proj(SiLU(temb)) per channel, GN-SiLU-conv2, + the input (through a
    1x1 ``conv_shortcut`` when the width changes). ``temb`` None: no time input (the VAE)."""

    out_ch: int
    groups: int
    eps: float
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        b, hh, ww, c_in = x.shape  # [B, H, W, C_in]
        h = conv(self.out_ch, name="conv1", dtype=self.dtype)(
            nn.silu(group_norm(self.groups, self.eps, name="norm1", dtype=self.dtype)(x)))
        if temb is not None:
            h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = conv(self.out_ch, name="conv2", dtype=self.dtype)(
            nn.silu(group_norm(self.groups, self.eps, name="norm2", dtype=self.dtype)(h)))
        if c_in != self.out_ch:
            x = conv(self.out_ch, k=1, name="conv_shortcut", dtype=self.dtype)(x)
        out = x + h
        assert out.shape == (b, hh, ww, self.out_ch), out.shape
        return out


class Downsample(nn.Module):
    """A stride-2 3x3 convolution ``conv`` (padding 1: the SD-1.x UNet's ``downsample_padding``)."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(x.shape[-1], stride=2, name="conv", dtype=self.dtype)(x)  # [B, H/2, W/2, C]


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution ``conv``."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return conv(x.shape[-1], name="conv", dtype=self.dtype)(x)
