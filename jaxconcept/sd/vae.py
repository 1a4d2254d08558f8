"""The decoder of SD-1.x's VAE (diffusers' ``AutoencoderKL``, Rombach et al. 2022) in Flax linen.

post_quant_conv (1x1); decoder: conv_in, a middle ResNet - single-head self-attention - ResNet,
up blocks of ``layers_per_block + 1`` ResNet blocks with nearest-neighbour upsampling (all but
the last), GN-SiLU-conv_out. GroupNorm epsilon 1e-6 throughout (diffusers' VAE).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxconcept.sd.blocks import Attention, ResnetBlock, Upsample, conv, group_norm
from jaxconcept.sd.configs import VAEConfig

EPS = 1e-6


class MidBlock(nn.Module):
    """``resnets_0`` - single-head self-attention ``attentions_0`` - ``resnets_1``."""

    groups: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, h):
        c = h.shape[-1]
        h = ResnetBlock(c, self.groups, EPS, self.dtype, name="resnets_0")(h)
        h = Attention(1, c, qkv_bias=True, groups=self.groups, dtype=self.dtype, name="attentions_0")(h)
        return ResnetBlock(c, self.groups, EPS, self.dtype, name="resnets_1")(h)


class UpBlock(nn.Module):
    """``layers`` ResNet blocks to width ``ch``, then ``upsamplers_0`` when ``upsample``."""

    ch: int
    layers: int
    upsample: bool
    groups: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, h):
        for j in range(self.layers):
            h = ResnetBlock(self.ch, self.groups, EPS, self.dtype, name=f"resnets_{j}")(h)
        return Upsample(self.dtype, name="upsamplers_0")(h) if self.upsample else h


class Decoder(nn.Module):
    """conv_in, mid_block, up_blocks_i (widths reversed), GN-SiLU-conv_out."""

    cfg: VAEConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, dt = self.cfg, self.dtype
        chs = tuple(reversed(c.block_out_channels))
        h = conv(chs[0], name="conv_in", dtype=dt)(z)
        h = MidBlock(c.norm_num_groups, dt, name="mid_block")(h)
        for i, ch in enumerate(chs):
            h = UpBlock(ch, c.layers_per_block + 1, i < len(chs) - 1, c.norm_num_groups, dt, name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(c.norm_num_groups, EPS, name="conv_norm_out", dtype=dt)(h))
        return conv(c.out_channels, name="conv_out", dtype=dt)(h)


class VAEDecoder(nn.Module):
    """Latents to images.

    Call: ``z [B, h, w, latent_channels]`` (already divided by ``scaling_factor``) ->
    ``[B, h * 2^(levels-1), w * 2^(levels-1), out_channels]`` float32, nominally in [-1, 1].
    Submodules: post_quant_conv, decoder/{conv_in, mid_block, up_blocks_i, conv_norm_out, conv_out}.
    """

    cfg: VAEConfig = VAEConfig()
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, z):
        z = conv(self.cfg.latent_channels, k=1, name="post_quant_conv", dtype=self.dtype)(z.astype(self.dtype))
        return Decoder(self.cfg, self.dtype, name="decoder")(z).astype(jnp.float32)
