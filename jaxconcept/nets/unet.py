"""U-Net score network for images (SPEC A2), with per-block conditioning and named tap points."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept.nets.layers import CondMLP, Tap, TimeEmbed

zeros = nn.initializers.zeros


class ResBlock(nn.Module):
    """GN-GELU-conv, + per-channel conditioning biases, GN-GELU-dropout-conv(zero init), + skip.

    Taps: ``cond_t`` and ``cond_c`` (the time / concept projections, [B, ch]) and ``out``.
    """

    ch: int
    groups: int
    dropout: float
    conditioning: str
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, temb, cemb, train: bool):
        h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name="conv_0")(
            nn.gelu(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm_0")(x)))
        if self.conditioning == "sep_mlp":  # each block embeds the raw inputs with its own MLPs
            pt = CondMLP(self.ch, self.dtype, name="emb_t")(temb)
            pc = CondMLP(self.ch, self.dtype, name="emb_c")(cemb)
        else:  # shared embedders upstream; one linear projection per block
            pt = nn.Dense(self.ch, dtype=self.dtype, name="emb_t")(temb)
            pc = nn.Dense(self.ch, dtype=self.dtype, name="emb_c")(cemb)
        h = h + Tap(name="cond_t")(pt)[:, None, None, :] + Tap(name="cond_c")(pc)[:, None, None, :]
        h = nn.gelu(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.ch, (3, 3), kernel_init=zeros, dtype=self.dtype, name="conv_1")(h)
        if x.shape[-1] != self.ch:
            x = nn.Conv(self.ch, (1, 1), dtype=self.dtype, name="skip")(x)
        return Tap(name="out")(x + h)


class Attention(nn.Module):
    """Multi-head self-attention over pixels with 1x1 convs for q, k, v and out, residual."""

    heads: int
    groups: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape  # [B, H, W, C]
        n = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        q, k, v = (nn.Conv(c, (1, 1), dtype=self.dtype, name=nm)(n).reshape(b, hh * ww, self.heads, c // self.heads)
                   for nm in ("q", "k", "v"))
        a = nn.dot_product_attention(q, k, v).reshape(b, hh, ww, c)
        return Tap(name="out")(x + nn.Conv(c, (1, 1), dtype=self.dtype, name="proj")(a))


class UNet(nn.Module):
    ch: int = 64
    ch_mult: tuple = (1, 2, 4)
    num_res_blocks: int = 2
    num_heads: int = 4
    norm_groups: int = 8
    dropout: float = 0.1
    mid_attention: bool = True
    time_embed_dim: int = 64
    embed_dim: int = 256
    conditioning: str = "sep_mlp"
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, t, cond, train: bool = False):
        b, _, _, c_in = x.shape  # [B, H, W, 3]
        blk = dict(groups=self.norm_groups, dropout=self.dropout, conditioning=self.conditioning, dtype=self.dtype)
        temb = TimeEmbed(self.time_embed_dim, self.embed_dim, self.dtype, name="time_embed")(t)
        cemb = cond.astype(self.dtype)
        if self.conditioning != "sep_mlp":
            init = zeros if self.conditioning == "common_zerolinear" else nn.linear.default_kernel_init
            cemb = nn.Dense(self.embed_dim, kernel_init=init, dtype=self.dtype, name="cond_embed")(cemb)
        h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        skips = [h]
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, name=f"down_{i}_block_{j}", **blk)(h, temb, cemb, train)
                skips.append(h)
            if i < len(self.ch_mult) - 1:
                h = nn.Conv(h.shape[-1], (2, 2), strides=(2, 2), dtype=self.dtype, name=f"down_{i}_downsample")(h)
                skips.append(h)
        h = ResBlock(h.shape[-1], name="mid_block_0", **blk)(h, temb, cemb, train)
        if self.mid_attention:
            h = Attention(self.num_heads, self.norm_groups, self.dtype, name="mid_attn")(h)
        h = ResBlock(h.shape[-1], name="mid_block_1", **blk)(h, temb, cemb, train)
        for i, mult in reversed(list(enumerate(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.ch * mult, name=f"up_{i}_block_{j}", **blk)(h, temb, cemb, train)
            if i > 0:
                h = nn.ConvTranspose(h.shape[-1], (2, 2), strides=(2, 2), dtype=self.dtype, name=f"up_{i}_upsample")(h)
        assert not skips
        h = nn.gelu(nn.GroupNorm(self.norm_groups, epsilon=1e-6, dtype=self.dtype, name="norm_out")(h))
        out = nn.Conv(c_in, (3, 3), kernel_init=zeros, dtype=self.dtype, name="conv_out")(h)
        assert out.shape == x.shape
        return out.astype(jnp.float32)
