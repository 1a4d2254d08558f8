"""Layers shared by the score networks: named tap points, time embedding, conditioning MLPs, and
Dense/Conv constructors initialised as the reference's PyTorch layers are.

PyTorch's default ``Linear``/``Conv`` init draws kernel and bias from U(-1/sqrt(fan_in),
1/sqrt(fan_in)); Flax's default is lecun-normal kernels and zero biases (a kernel about sqrt(3)
larger). The reference's learning dynamics are what we reproduce, so we use its init.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxconcept.nets import conv as convs

zeros = nn.initializers.zeros


def gelu(x):
    """Exact (erf) GELU, PyTorch's ``nn.GELU()`` default; Flax's default is the tanh approximation."""
    return nn.gelu(x, approximate=False)


def _gn_stats(x, groups: int, eps: float):
    """Per-example, per-group mean and 1/sqrt(var + eps) of x [B, H, W, C] in float32 ([B, G] each),
    with var = E[x^2] - E[x]^2 clipped at 0 (Flax's GroupNorm, ``use_fast_variance``)."""
    b, h, w, c = x.shape
    x = x.astype(jnp.float32)
    n = h * w * (c // groups)
    s1 = jnp.sum(x, axis=(1, 2)).reshape(b, groups, c // groups).sum(-1)  # channel sums first: one pass
    s2 = jnp.sum(x * x, axis=(1, 2)).reshape(b, groups, c // groups).sum(-1)
    mean = s1 / n
    return mean, lax.rsqrt(jnp.maximum(s2 / n - mean * mean, 0.0) + eps)


def _per_channel(v, c: int):
    """[B, G] -> [B, 1, 1, C]: each group's value for each of its channels."""
    return jnp.repeat(v, c // v.shape[1], axis=1)[:, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_gelu(x, scale, bias, groups: int, eps: float):
    """GELU(GroupNorm(x)) in float32 with a hand-written gradient: x [B, H, W, C], scale and bias
    [C] -> [B, H, W, C].

    y = (x - mean) r scale + bias, r = 1/sqrt(var + eps) per example and group (Wu & He 2018, as
    Flax's ``GroupNorm``), z = GELU(y) (exact, erf). The gradient (x_hat = (x - mean) r,
    g = dz GELU'(y) scale): dx = r (g - mean_grp(g) - x_hat mean_grp(g x_hat)), dscale =
    sum dz GELU'(y) x_hat, dbias = sum dz GELU'(y), in two passes over x and dz where autodiff of
    the composition made about a dozen (2x faster at 32x32x64 on the development CPU).
    """
    return _group_norm_gelu_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_gelu_fwd(x, scale, bias, groups, eps):
    mean, r = _gn_stats(x, groups, eps)
    c = x.shape[-1]
    y = (x - _per_channel(mean, c)) * (_per_channel(r, c) * scale[None, None, None]) + bias[None, None, None]
    return gelu(y), (x, scale, bias, mean, r)


def _group_norm_gelu_bwd(groups, eps, res, dz):
    x, scale, bias, mean, r = res
    b, h, w, c = x.shape
    rc = _per_channel(r, c)
    x_hat = (x - _per_channel(mean, c)) * rc
    scale, bias = scale[None, None, None], bias[None, None, None]  # [1, 1, 1, C]
    y = x_hat * scale + bias
    # GELU'(y) = Phi(y) + y phi(y)
    dy = dz * (0.5 * (1.0 + lax.erf(y * (1 / math.sqrt(2)))) + y * jnp.exp(-0.5 * y * y) / math.sqrt(2 * math.pi))
    s_dy, s_dy_xhat = jnp.sum(dy, axis=(1, 2)), jnp.sum(dy * x_hat, axis=(1, 2))  # [B, C] each
    n = h * w * (c // groups)
    m1 = (s_dy * scale[0, 0]).reshape(b, groups, c // groups).sum(-1) / n  # mean_grp(g) [B, G]
    m2 = (s_dy_xhat * scale[0, 0]).reshape(b, groups, c // groups).sum(-1) / n  # mean_grp(g x_hat)
    dx = rc * (dy * scale - _per_channel(m1, c) - x_hat * _per_channel(m2, c))
    return dx.astype(x.dtype), jnp.sum(s_dy_xhat, 0), jnp.sum(s_dy, 0)


group_norm_gelu.defvjp(_group_norm_gelu_fwd, _group_norm_gelu_bwd)


class GroupNormGELU(nn.Module):
    """GELU(GroupNorm(x)) through ``group_norm_gelu``, with ``nn.GroupNorm``'s parameters
    (``scale`` ones and ``bias`` zeros, [C] float32); the output in ``dtype``."""

    groups: int
    epsilon: float
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        return group_norm_gelu(x, scale, bias, self.groups, self.epsilon).astype(self.dtype)


def norm_gelu(x, groups: int, eps: float, *, name: str, dtype, impl: str = "xla"):
    """GELU(GroupNorm(x)) as a submodule ``name`` of the calling module: Flax's ``GroupNorm`` then
    ``gelu`` ("xla"), or the fused ``GroupNormGELU`` ("explicit", the CPU formulation); the same
    parameters either way."""
    if impl == "explicit":
        return GroupNormGELU(groups, eps, dtype, name=name)(x)
    return gelu(nn.GroupNorm(groups, epsilon=eps, dtype=dtype, name=name)(x))


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, d: int):
    return lax.shift_left(x, jnp.uint32(d)) | lax.shift_right_logical(x, jnp.uint32(32 - d))


def threefry_bits(key, shape) -> jax.Array:
    """uint32 random bits of ``shape``, equal to ``jax.random.bits(key, shape)`` for a threefry key
    in JAX's partitionable mode (counter = the element's row-major index), computed by the 20
    unrolled Threefry-2x32 rounds (Salmon et al. 2011, Random123) as elementwise ops that XLA
    fuses into one pass. JAX's own CPU lowering rolls the rounds into a 5-iteration loop of passes
    over the whole array (44 ms for a 64x32x32x64 dropout mask on the development CPU).
    Raises ValueError for 2^32 or more elements."""
    size = math.prod(shape)
    if size >= 2 ** 32:
        raise ValueError(f"threefry_bits: {size} elements, at most 2**32 - 1 supported")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    k = (key[0], key[1], key[0] ^ key[1] ^ jnp.uint32(0x1BD11BDA))
    x0 = jnp.zeros(shape, jnp.uint32) + k[0]  # the counter's high word is 0 below 2^32 elements
    x1 = lax.iota(jnp.uint32, size).reshape(shape) + k[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotl(x1, r)
        x0, x1 = x0 + k[(i + 1) % 3], x1 + k[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0 ^ x1


def bernoulli(key, p: float, shape) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)`` bit for bit (a float32 uniform from the bits'
    top 23 as mantissa, compared with p), from ``threefry_bits``."""
    bits = lax.shift_right_logical(threefry_bits(key, shape), jnp.uint32(9)) | jnp.uint32(0x3F800000)
    return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(1.0) < jnp.float32(p)


def is_number(x) -> bool:
    """``x`` is a Python number (a setting fixed when the program is traced), not a traced array."""
    return isinstance(x, (int, float))


class Dropout(nn.Module):
    """``nn.Dropout`` (same rng stream, same mask, same scaling) with a rate that may be traced (a
    per-member value in a stack of members differing in ``model.dropout``): a traced rate of 0
    keeps every entry and divides by 1, the numbers of no dropout. The mask is ``bernoulli``
    ("explicit") or ``jax.random.bernoulli`` ("xla"): the same bits either way."""

    rate: object  # float, or a traced f32[]
    impl: str = "explicit"

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or (is_number(self.rate) and self.rate == 0.0):
            return x
        keep = 1.0 - self.rate
        draw = bernoulli if self.impl == "explicit" else jax.random.bernoulli
        mask = draw(self.make_rng("dropout"), keep, x.shape)
        if is_number(keep):
            return lax.select(mask, x / keep, jnp.zeros_like(x))
        # XLA turns a division by a constant into a product with its reciprocal: so does a traced rate
        return lax.select(mask, x * (1.0 / keep).astype(x.dtype), jnp.zeros_like(x))


def dropout(x, rate, deterministic: bool, impl: str = "xla"):
    """Dropout as the calling module's submodule ``Dropout_0``: ``nn.Dropout`` ("xla", a fixed rate)
    or ``Dropout`` ("explicit", or a traced rate); the same masks either way."""
    if impl == "explicit" or not is_number(rate):
        return Dropout(rate, impl, name="Dropout_0")(x, deterministic)
    return nn.Dropout(rate, deterministic=deterministic, name="Dropout_0")(x)


class Tap(nn.Module):
    """A parameter-free identity: a named point whose output interventions may transform.

    The point's name is ``"/".join(module.path)``; see ``jaxconcept.elicit.edits``.
    """

    @nn.compact
    def __call__(self, x):
        return x


def tap_calls(fn) -> list[str]:
    """Names (``"/".join(module.path)``) of every ``Tap`` that ``fn()`` calls, in call order, once
    each. ``fn`` (e.g. a network's ``init``) is traced with ``jax.eval_shape``: nothing is computed."""
    names = []

    def record(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, Tap) and ctx.method_name == "__call__":
            names.append("/".join(ctx.module.path))
        return next_fun(*args, **kwargs)

    def run():
        with nn.intercept_methods(record):
            return fn()

    jax.eval_shape(run)
    return list(dict.fromkeys(names))


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
