"""SD-1.x's conditional UNet (diffusers' ``UNet2DConditionModel`` layout) in Flax linen.

eps_hat = UNet(z_t, t, c): conv_in; down blocks (ResNet blocks, each followed by a cross-attention
transformer in the ``CrossAttnDownBlock2D``s, then a stride-2 conv except in the last); a middle
ResNet - transformer - ResNet; up blocks (one more ResNet block than down, each taking a skip,
transformers in the ``CrossAttnUpBlock2D``s, nearest-neighbour upsampling except in the last);
GN-SiLU-conv_out. Rombach et al. 2022 (latent diffusion), Appendix; diffusers' config names.

Tap points: ``context`` (the text conditioning as the UNet receives it) and every
cross-attention's input, ``.../transformer_blocks_k/attn2/context``. Under classifier-free
guidance the UNet sees the null and the text conditioning in one batch, so edits there apply to
both (give an edit per-example strengths to touch one).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxconcept.nets.layers import Tap
from jaxconcept.sd.blocks import Attention, Downsample, ResnetBlock, Upsample, conv, group_norm
from jaxconcept.sd.configs import UNetConfig

TRANSFORMER_GN_EPS = 1e-6  # diffusers' Transformer2DModel GroupNorm
LAYER_NORM_EPS = 1e-5


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, shift: float):
    """Sinusoidal embedding of timesteps t [B] (0 .. 999, may be fractional) -> [B, dim]:
    [sin, cos] (or [cos, sin]) of t * 10000^(-i / (dim/2 - shift)), i < dim/2 (Ho et al. 2020,
    as diffusers' ``get_timestep_embedding``)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift))  # [dim/2]
    arg = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, dim/2]
    sin, cos = jnp.sin(arg), jnp.cos(arg)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class GEGLU(nn.Module):
    """``proj`` to 2 x inner, then hidden * GELU(gate) (Shazeer 2020; exact GELU)."""

    inner: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU to 4x the width (``net_0``), then back (``net_2``)."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock``: pre-LayerNorm self-attention ``attn1``,
    cross-attention ``attn2`` on the text conditioning, GEGLU feed-forward ``ff``; residuals."""

    heads: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        d = x.shape[-1] // self.heads
        ln = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.heads, d, dtype=self.dtype, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, d, cross=True, dtype=self.dtype, name="attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(ln("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` (SD-1.x: 1x1 convolutions in and out): GN, proj_in, the
    pixels as a sequence through ``transformer_blocks_k``, proj_out, + the input."""

    heads: int
    groups: int
    layers: int = 1
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, hh, ww, c = x.shape  # [B, H, W, C]
        h = group_norm(self.groups, TRANSFORMER_GN_EPS, name="norm", dtype=self.dtype)(x)
        h = conv(c, k=1, name="proj_in", dtype=self.dtype)(h).reshape(b, hh * ww, c)  # [B, HW, C]
        for k in range(self.layers):
            h = TransformerBlock(self.heads, self.dtype, name=f"transformer_blocks_{k}")(h, context)
        return x + conv(c, k=1, name="proj_out", dtype=self.dtype)(h.reshape(b, hh, ww, c))


class TimestepEmbedding(nn.Module):
    """linear_1 - SiLU - linear_2 of the sinusoidal embedding."""

    features: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, e):
        h = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(e))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(h)


class Block(nn.Module):
    """One down or up block: ``layers`` ResNet blocks (``resnets_j``), each followed by a
    cross-attention transformer (``attentions_j``) when ``heads`` > 0, then a stride-2 conv
    (``downsamplers_0``, down) or an upsampling (``upsamplers_0``, up) when ``resample``.

    Down (``skips`` None): returns (h, the outputs kept as skips). Up: ``skips`` holds ``layers``
    down-path outputs and ResNet block j first concatenates ``skips[-1 - j]`` to its input;
    returns (h, []).
    """

    cfg: UNetConfig
    ch: int
    layers: int
    heads: int
    resample: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, skips=None):
        c, up = self.cfg, skips is not None
        kept = []
        for j in range(self.layers):
            if up:
                h = jnp.concatenate([h, skips[-1 - j]], axis=-1)  # [B, H, W, C + C_skip]
            h = ResnetBlock(self.ch, c.norm_num_groups, c.norm_eps, self.dtype, name=f"resnets_{j}")(h, temb)
            if self.heads:
                h = Transformer2D(self.heads, c.norm_num_groups, c.transformer_layers_per_block, self.dtype,
                                  name=f"attentions_{j}")(h, context)
            kept.append(h)
        if self.resample and up:
            h = Upsample(self.dtype, name="upsamplers_0")(h)
        elif self.resample:
            h = Downsample(self.dtype, name="downsamplers_0")(h)
            kept.append(h)
        return h, ([] if up else kept)


class MidBlock(nn.Module):
    """``resnets_0`` - ``attentions_0`` - ``resnets_1`` (diffusers' ``UNetMidBlock2DCrossAttn``)."""

    cfg: UNetConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context):
        c, ch = self.cfg, h.shape[-1]
        h = ResnetBlock(ch, c.norm_num_groups, c.norm_eps, self.dtype, name="resnets_0")(h, temb)
        h = Transformer2D(c.heads[-1], c.norm_num_groups, c.transformer_layers_per_block, self.dtype,
                          name="attentions_0")(h, context)
        return ResnetBlock(ch, c.norm_num_groups, c.norm_eps, self.dtype, name="resnets_1")(h, temb)


class UNet(nn.Module):
    """eps prediction of SD-1.x's UNet.

    Call: ``(x [B, h, w, in_channels], t [B] timesteps in 0..999, context [B, T, cross_attention_dim])
    -> eps_hat [B, h, w, out_channels]`` float32; h and w divisible by 2^(levels - 1).
    Submodules: time_embedding/linear_{1,2}, conv_in, down_blocks_i/{resnets_j, attentions_j,
    downsamplers_0}, mid_block/{resnets_0, attentions_0, resnets_1}, up_blocks_i/{resnets_j,
    attentions_j, upsamplers_0}, conv_norm_out, conv_out.
    """

    cfg: UNetConfig = UNetConfig()
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, t, context):
        c, dt = self.cfg, self.dtype
        b, n = x.shape[0], len(c.block_out_channels)
        assert t.shape == (b,) and context.shape[0] == b, (x.shape, t.shape, context.shape)
        context = Tap(name="context")(context.astype(dt))  # [B, T, D]
        ch0 = c.block_out_channels[0]
        temb = timestep_embedding(t, ch0, c.flip_sin_to_cos, c.freq_shift).astype(dt)  # [B, ch0]
        temb = TimestepEmbedding(4 * ch0, dt, name="time_embedding")(temb)  # [B, 4 ch0]
        h = conv(ch0, name="conv_in", dtype=dt)(x.astype(dt))  # [B, h, w, ch0]
        skips = [h]
        for i, (kind, ch) in enumerate(zip(c.down_block_types, c.block_out_channels)):
            heads = c.heads[i] if kind.startswith("CrossAttn") else 0
            h, kept = Block(c, ch, c.layers_per_block, heads, i < n - 1, dt, name=f"down_blocks_{i}")(h, temb, context)
            skips += kept
        h = MidBlock(c, dt, name="mid_block")(h, temb, context)
        heads_up = tuple(reversed(c.heads))
        for i, (kind, ch) in enumerate(zip(c.up_block_types, reversed(c.block_out_channels))):
            heads = heads_up[i] if kind.startswith("CrossAttn") else 0
            k = c.layers_per_block + 1
            skips, mine = skips[:-k], tuple(skips[-k:])
            h, _ = Block(c, ch, k, heads, i < n - 1, dt, name=f"up_blocks_{i}")(h, temb, context, mine)
        assert not skips and h.shape[:3] == x.shape[:3], h.shape
        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", dtype=dt)(h))
        return conv(c.out_channels, name="conv_out", dtype=dt)(h).astype(jnp.float32)  # [B, h, w, out]
