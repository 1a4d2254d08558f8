"""CLIP's text transformer (Radford et al. 2021), the text encoder of SD-1.x, in Flax linen.

Token and position embeddings, pre-LayerNorm transformer layers with causal self-attention and a
quick-GELU MLP, a final LayerNorm; SD conditions on the final hidden states of all 77 positions
(transformers' ``CLIPTextModel.last_hidden_state``). Names follow transformers'
(``encoder.layers.3.self_attn.q_proj`` is our ``encoder/layers_3/self_attn/q_proj``).

Tap points: ``embeddings/tokens`` (token embeddings before the positions are added),
``encoder/layers_i/out`` (each layer's output) and ``conditioning`` (the encoder's output, the
text conditioning the UNet attends to).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconcept.nets.layers import Tap
from jaxconcept.sd.blocks import attend
from jaxconcept.sd.configs import CLIPConfig


def quick_gelu(x):
    """x sigmoid(1.702 x): CLIP's GELU approximation (``hidden_act="quick_gelu"``)."""
    return x * jax.nn.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    """token_embedding(ids) [x token_scale] -> tap ``tokens``, + position_embedding: [B, T, D]."""

    cfg: CLIPConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, ids, token_scale=None):
        c = self.cfg
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(ids)  # [B, T, D]
        if token_scale is not None:
            tok = tok * token_scale[..., None].astype(tok.dtype)
        tok = Tap(name="tokens")(tok)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(ids.shape[1]))  # [T, D]
        return tok + pos[None]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with q/k/v/out projections (biases): [B, T, D] -> same."""

    heads: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(x.shape[-1], dtype=self.dtype, name=name)  # noqa: E731
        a = attend(dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x), self.heads, causal=True)
        return dense("out_proj")(a)


class MLP(nn.Module):
    """fc1 - activation (``hidden_act``) - fc2."""

    cfg: CLIPConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        act = quick_gelu if self.cfg.hidden_act == "quick_gelu" else lambda a: nn.gelu(a, approximate=False)
        h = act(nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class Layer(nn.Module):
    """Pre-LayerNorm transformer layer (attention, then MLP, each residual); tap ``out``."""

    cfg: CLIPConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        ln = lambda name: nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + SelfAttention(self.cfg.num_attention_heads, self.dtype, name="self_attn")(ln("layer_norm1")(x))
        x = x + MLP(self.cfg, self.dtype, name="mlp")(ln("layer_norm2")(x))
        return Tap(name="out")(x)


class Encoder(nn.Module):
    """``num_hidden_layers`` layers, ``layers_i``."""

    cfg: CLIPConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.cfg.num_hidden_layers):
            x = Layer(self.cfg, self.dtype, name=f"layers_{i}")(x)
        return x


class CLIPTextEncoder(nn.Module):
    """The text conditioning of token ids.

    Call: ``(ids [B, T] int32, token_scale [B, T] or None) -> [B, T, hidden_size]`` float32, T at
    most ``max_position_embeddings``. ``token_scale`` multiplies each position's token embedding
    (the ``token`` overprompting method; None is 1).
    """

    cfg: CLIPConfig = CLIPConfig()
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, ids, token_scale=None):
        assert ids.ndim == 2 and ids.shape[1] <= self.cfg.max_position_embeddings, ids.shape
        x = Embeddings(self.cfg, self.dtype, name="embeddings")(ids, token_scale)  # [B, T, D]
        x = Encoder(self.cfg, self.dtype, name="encoder")(x)
        x = nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        return Tap(name="conditioning")(x.astype(jnp.float32))
