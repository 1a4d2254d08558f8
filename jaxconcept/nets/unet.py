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
        else:  # shared embedders upstream; one (zero-initialised) linear projection per block
            init = zeros if self.conditioning == "common_zerolinear" else nn.linear.default_kernel_init
            pt = nn.Dense(self.ch, kernel_init=init, dtype=self.dtype, name="emb_t")(temb)
            pc = nn.Dense(self.ch, kernel_init=init, dtype=self.dtype, name="emb_c")(cemb)
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
    """Levels of widths ch*ch_mult, each num_res_blocks ResNet blocks then a stride-2 2x2 conv
    (not after the last); middle ResNet block, attention, ResNet block; the up path mirrors it:
    per level num_res_blocks blocks (the first also takes the skip), a 2x2 transposed conv to the
    next level's width, then concatenation with that level's pre-downsampling activations. The
    input is added to the output (as the reference does).

    Conditioning "sep_mlp": the raw concept vector and the time embedding go to every block's own
    MLPs. "common_linear"/"common_zerolinear": one shared concept embedder (Linear-GELU-Linear-GELU
    to ``time_embed_dim``), then per block one (zero-initialised) linear projection of each input.
    """

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
        temb = TimeEmbed(self.time_embed_dim, self.embed_dim, self.dtype, name="time_embed")(t)  # [B, 256]
        cemb = cond.astype(self.dtype)  # [B, cond_dim]
        if self.conditioning != "sep_mlp":
            cemb = CondMLP(self.time_embed_dim, self.dtype, name="cond_embed")(cemb)
        widths = [self.ch * m for m in self.ch_mult]
        h = nn.Conv(widths[0], (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        skips = []
        for i, w in enumerate(widths):
            for j in range(self.num_res_blocks):
                h = ResBlock(w, name=f"down_{i}_block_{j}", **blk)(h, temb, cemb, train)
            if i < len(widths) - 1:
                skips.append(h)
                h = nn.Conv(w, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype, name=f"down_{i}_downsample")(h)
        h = ResBlock(widths[-1], name="mid_block_0", **blk)(h, temb, cemb, train)
        if self.mid_attention:
            h = Attention(self.num_heads, self.norm_groups, self.dtype, name="mid_attn")(h)
        h = ResBlock(widths[-1], name="mid_block_1", **blk)(h, temb, cemb, train)
        for i in reversed(range(len(widths))):
            for j in range(self.num_res_blocks):
                h = ResBlock(widths[i], name=f"up_{i}_block_{j}", **blk)(h, temb, cemb, train)
            if i > 0:
                h = nn.ConvTranspose(widths[i - 1], (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                                     name=f"up_{i}_upsample")(h)
                h = jnp.concatenate([h, skips.pop()], axis=-1)
        assert not skips
        h = nn.gelu(nn.GroupNorm(self.norm_groups, epsilon=1e-6, dtype=self.dtype, name="norm_out")(h))
        out = nn.Conv(c_in, (3, 3), kernel_init=zeros, dtype=self.dtype, name="conv_out")(h)
        assert out.shape == x.shape
        return (x + out).astype(jnp.float32)
