"""U-Net score network for images (docs/study.md A2), laid out as the reference's, with per-block
conditioning and named tap points."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept.nets.layers import CondMLP, Tap, TimeEmbed, conv, conv_transpose, dense, dropout, norm_gelu

EPS = 1e-6  # GroupNorm epsilon


class ResBlock(nn.Module):
    """GN-GELU-conv3x3, + one per-channel bias per conditioning input, GN-GELU-dropout-conv3x3
    (zero init), + skip (1x1 conv when the width changes).

    Taps: ``cond_t`` and ``cond_c`` (the time / concept-vector projections, [B, ch]) and ``out``.
    ``conditioning``: "sep_mlp" embeds the raw inputs with this block's own Linear-GELU-Linear-GELU;
    "common_linear" / "common_zerolinear" project shared embeddings with one (zero-init) Linear.
    """

    ch: int
    groups: int
    dropout: object  # rate: a float, or a traced f32[] (``nets.with_dropout``)
    conditioning: str
    dtype: object = jnp.float32
    conv_impl: str = "xla"  # the convolutions' formulation (jaxconcept.nets.conv)

    @nn.compact
    def __call__(self, x, temb, cemb, train: bool):
        b, hh, ww, c_in = x.shape  # [B, H, W, C_in]
        h = norm_gelu(x, self.groups, EPS, dtype=self.dtype, impl=self.conv_impl, name="norm_0")
        h = conv(self.ch, c_in, 3, dtype=self.dtype, impl=self.conv_impl, name="conv_0")(h)  # [B, H, W, ch]
        if self.conditioning == "sep_mlp":
            pt = CondMLP(self.ch, self.dtype, name="emb_t")(temb)
            pc = CondMLP(self.ch, self.dtype, name="emb_c")(cemb)
        else:
            zero = self.conditioning == "common_zerolinear"
            pt = dense(self.ch, temb.shape[-1], zero=zero, dtype=self.dtype, name="emb_t")(temb)
            pc = dense(self.ch, cemb.shape[-1], zero=zero, dtype=self.dtype, name="emb_c")(cemb)
        pt, pc = Tap(name="cond_t")(pt), Tap(name="cond_c")(pc)  # [B, ch] each
        h = h + pt[:, None, None, :] + pc[:, None, None, :]
        h = norm_gelu(h, self.groups, EPS, dtype=self.dtype, impl=self.conv_impl, name="norm_1")
        h = dropout(h, self.dropout, not train, self.conv_impl)
        h = conv(self.ch, self.ch, 3, zero=True, dtype=self.dtype, impl=self.conv_impl, name="conv_1")(h)
        if c_in != self.ch:
            x = conv(self.ch, c_in, 1, dtype=self.dtype, impl=self.conv_impl, name="skip")(x)
        out = x + h
        assert out.shape == (b, hh, ww, self.ch)
        return Tap(name="out")(out)


class Attention(nn.Module):
    """Multi-head self-attention over pixels: GN, 1x1 convs for q, k, v and out, residual.

    Logits and softmax are computed in float32 whatever the compute dtype. Tap: ``out``.
    """

    heads: int
    groups: int
    dtype: object = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape  # [B, H, W, C]
        d = c // self.heads
        n = nn.GroupNorm(self.groups, epsilon=EPS, dtype=self.dtype, name="norm")(x)
        q, k, v = (conv(c, c, 1, dtype=self.dtype, impl=self.conv_impl, name=nm)(n).reshape(b, hh * ww, self.heads, d)
                   for nm in ("q", "k", "v"))  # [B, HW, heads, d] each
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
        w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, heads, HW, HW]
        a = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, hh, ww, c)
        return Tap(name="out")(x + conv(c, c, 1, dtype=self.dtype, impl=self.conv_impl, name="proj")(a))


class UNet(nn.Module):
    """The reference's conditional U-Net (its ``CUNet``), predicting eps.

    conv3x3 in; per level of width ch*ch_mult[i], num_res_blocks ResNet blocks (the first changes
    the width) then, except at the last level, a stride-2 2x2 conv (its input kept as a skip);
    middle ResNet block, self-attention, ResNet block; up path per level (deepest first):
    num_res_blocks blocks at that level's width (the first also takes the concatenated skip),
    then, except at level 0, a 2x2 transposed conv to the next level's width and concatenation
    with that level's skip; GN-GELU-conv3x3 (zero init) out; the input is added to the output
    (the reference's residual, so eps_hat = z_t at initialisation).

    Conditioning "sep_mlp": the time embedding (sinusoidal -> Linear-GELU-Linear-GELU, shared) and
    the raw concept vector go to every block's own MLPs. "common_linear"/"common_zerolinear": the
    concept vector also goes through one shared Linear-GELU-Linear-GELU to ``cond_embed_dim``, then
    every block projects each embedding with one (zero-initialised) Linear.

    Submodule names: time_embed, cond_embed, conv_in, down_{i}_block_{j}, down_{i}_downsample,
    mid_block_0, mid_attn, mid_block_1, up_{i}_block_{j}, up_{i}_upsample, norm_out, conv_out.
    """

    ch: int = 64
    ch_mult: tuple = (1, 2, 4)
    num_res_blocks: int = 2
    num_heads: int = 4
    norm_groups: int = 8
    dropout: object = 0.1  # rate: a float, or a traced f32[] (``nets.with_dropout``)
    mid_attention: bool = True
    time_embed_dim: int = 64
    embed_dim: int = 256
    conditioning: str = "sep_mlp"
    cond_embed_dim: int = 64  # shared concept embedder width ("common_*"; the reference's default)
    dtype: object = jnp.float32
    conv_impl: str = "xla"  # "xla" | "explicit": how convolutions are written (jaxconcept.nets.conv)

    @nn.compact
    def __call__(self, x, t, cond, train: bool = False):
        b, hh, ww, c_in = x.shape  # [B, H, W, 3]
        assert t.shape == (b,) and cond.shape[0] == b, (x.shape, t.shape, cond.shape)
        blk = dict(groups=self.norm_groups, dropout=self.dropout, conditioning=self.conditioning, dtype=self.dtype,
                   conv_impl=self.conv_impl)
        cv = dict(dtype=self.dtype, impl=self.conv_impl)
        temb = TimeEmbed(self.time_embed_dim, self.embed_dim, dtype=self.dtype, name="time_embed")(t)  # [B, E]
        cemb = cond.astype(self.dtype)  # [B, cond_dim]
        if self.conditioning != "sep_mlp":
            cemb = CondMLP(self.cond_embed_dim, self.dtype, name="cond_embed")(cemb)  # [B, cond_embed_dim]
        widths = [self.ch * m for m in self.ch_mult]
        h = conv(widths[0], c_in, 3, name="conv_in", **cv)(x.astype(self.dtype))
        skips = []
        for i, w in enumerate(widths):
            for j in range(self.num_res_blocks):
                h = ResBlock(w, name=f"down_{i}_block_{j}", **blk)(h, temb, cemb, train)
            if i < len(widths) - 1:
                skips.append(h)  # [B, H/2^i, W/2^i, w]
                h = conv(w, w, 2, stride=2, name=f"down_{i}_downsample", **cv)(h)
        h = ResBlock(widths[-1], name="mid_block_0", **blk)(h, temb, cemb, train)
        if self.mid_attention:
            h = Attention(self.num_heads, self.norm_groups, self.dtype, self.conv_impl, name="mid_attn")(h)
        h = ResBlock(widths[-1], name="mid_block_1", **blk)(h, temb, cemb, train)
        for i in reversed(range(len(widths))):
            for j in range(self.num_res_blocks):
                h = ResBlock(widths[i], name=f"up_{i}_block_{j}", **blk)(h, temb, cemb, train)
            if i > 0:
                h = conv_transpose(widths[i - 1], 2, name=f"up_{i}_upsample", **cv)(h)
                h = jnp.concatenate([h, skips.pop()], axis=-1)  # [B, H/2^(i-1), W/2^(i-1), 2 w_{i-1}]
        assert not skips and h.shape == (b, hh, ww, widths[0]), h.shape
        h = norm_gelu(h, self.norm_groups, EPS, name="norm_out", **cv)
        out = conv(c_in, widths[0], 3, zero=True, name="conv_out", **cv)(h)
        return (x + out.astype(jnp.float32)).astype(jnp.float32)  # [B, H, W, 3]
