"""Convolutions of the U-Net in two formulations, chosen by ``model.conv`` (``resolve``).

"xla": Flax's ``nn.Conv`` / ``nn.ConvTranspose`` and XLA's own gradients (cuDNN on a GPU).

"explicit": the same maps, written so that XLA:CPU runs every piece as a canonical NHWC
convolution (YNNPACK) or a matmul, at top level and inside loops alike:
  * k x k, stride 1, SAME (k odd): ``lax.conv_general_dilated`` (NHWC, HWIO) with a custom VJP whose
    input gradient is the same kind of convolution of dy with the flipped, in/out-swapped kernel,
    and whose kernel gradient is one too, with the batch as its contracted feature axis
    (x as [C_in, H, W, B], dy as [H, W, B, C_out]; as XLA:CPU rewrites it at top level);
  * 1 x 1: a matmul over channels;
  * 2 x 2, stride 2, VALID (downsampling) and its transpose (upsampling): space-to-depth /
    depth-to-space reshapes around one matmul.
Why (measured on a 2-core AMD EPYC, jax 0.10.2; docs/benchmarks.md "CPU and convolutions"): XLA:CPU left the
kernel gradient of the stride-2 conv to a generic Eigen kernel (2.8 GFLOP/s, 0.78 s of a 5.4 s 2x2
U-Net step), and inside ``lax.scan`` it leaves the gradients' non-canonical convolutions to a naive
loop (a 4-layer conv net's gradient 170x slower than at top level), so the CPU path could not
scan over training steps or sampler steps. The formulations agree with "xla" to float32 rounding.

Parameters are identical in both: ``kernel`` [k, k, C_in, C_out] and ``bias`` [C_out], created in
the same order with the same initialisers, so a parameter tree serves either formulation.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "explicit")
_DN = ("NHWC", "HWIO", "NHWC")


def resolve(conv: str, backend: str | None = None) -> str:
    """The formulation ``model.conv`` names on ``backend`` (default: JAX's default backend):
    "auto" is "explicit" on CPU and "xla" elsewhere (GPU/TPU keep cuDNN/XLA convolutions).

    Raises:
      ValueError: ``conv`` is not one of IMPLS.
    """
    if conv not in IMPLS:
        raise ValueError(f"model.conv={conv!r} is invalid: allowed one of {', '.join(IMPLS)}")
    if conv != "auto":
        return conv
    return "explicit" if (backend or jax.default_backend()) == "cpu" else "xla"


def loop_safe(conv: str, backend: str | None = None) -> bool:
    """Whether a network whose convolutions use ``conv`` runs at full speed inside XLA loops
    (``lax.scan``, ``fori_loop``, ``lax.map``) on ``backend``: always, except "xla" on CPU."""
    return resolve(conv, backend) != "xla" or (backend or jax.default_backend()) != "cpu"


def _conv(x, w, pad: int):
    return lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DN)


@jax.custom_vjp
def conv_same(x, w):
    """Stride-1 'SAME' convolution of x [B, H, W, C_in] with w [k, k, C_in, C_out] (k odd) ->
    [B, H, W, C_out]; its gradients are canonical convolutions too (module docstring)."""
    return _conv(x, w, w.shape[0] // 2)


def _conv_same_fwd(x, w):
    return conv_same(x, w), (x, w)


def _conv_same_bwd(res, dy):
    x, w = res
    p = w.shape[0] // 2
    dx = _conv(dy, jnp.swapaxes(w[::-1, ::-1], 2, 3), p)  # [B, H, W, C_in]
    # dw[i, j, c, o] = sum_{b,h,w} x_pad[b, h+i, w+j, c] dy[b, h, w, o]: a conv over (h, w) whose
    # "batch" is c and whose contracted feature is b
    dw = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)).astype(x.dtype), p)  # [C_in, k, k, O]
    return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def pointwise(x, w):
    """1 x 1 convolution as a matmul: x [B, H, W, C_in], w [1, 1, C_in, C_out] -> [B, H, W, C_out]."""
    return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])


def space_to_depth_conv(x, w):
    """k x k, stride-k, 'VALID' convolution as one matmul: x [B, H, W, C_in], w [k, k, C_in, C_out]
    -> [B, H // k, W // k, C_out] (rows and columns beyond a multiple of k are dropped, as VALID)."""
    k = w.shape[0]
    b, h, wd, c = x.shape
    x = x[:, : h - h % k, : wd - wd % k].reshape(b, h // k, k, wd // k, k, c)
    return jnp.einsum("bhpwqc,pqco->bhwo", x, w)


def depth_to_space_conv_transpose(x, w):
    """Flax's ``ConvTranspose`` with a k x k kernel, stride k and 'VALID' padding, as one matmul:
    x [B, H, W, C_in], w [k, k, C_in, C_out] -> [B, k H, k W, C_out], where
    y[b, k h + p, k w + q] = x[b, h, w] @ w[k-1-p, k-1-q] (lax.conv_transpose does not flip its
    kernel, so the dilated correlation meets it reversed)."""
    k = w.shape[0]
    b, h, wd, _ = x.shape
    y = jnp.einsum("bhwc,pqco->bhpwqo", x, w[::-1, ::-1])
    return y.reshape(b, k * h, k * wd, w.shape[-1])


class Conv(nn.Module):
    """A k x k convolution with bias in the "explicit" formulation, with ``nn.Conv``'s parameters
    (same names, shapes, creation order and initialisers). ``transpose``: the stride-k transposed
    convolution of ``nn.ConvTranspose`` instead. stride must be 1 (SAME, k odd) or k (VALID)."""

    features: int
    kernel_size: int
    stride: int = 1
    transpose: bool = False
    kernel_init: object = nn.initializers.lecun_normal()
    bias_init: object = nn.initializers.zeros
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        if self.transpose:
            assert self.stride == k, "transposed convolutions are stride-k"
            y = depth_to_space_conv_transpose(x, kernel)
        elif k == 1:
            y = pointwise(x, kernel)
        elif self.stride == 1:
            assert k % 2 == 1, "stride-1 SAME convolutions need an odd kernel"
            y = conv_same(x, kernel)
        else:
            assert self.stride == k, "strided convolutions are k x k with stride k"
            y = space_to_depth_conv(x, kernel)
        return y + bias.reshape(1, 1, 1, -1)  # [B, H', W', features]


def make(impl: str, features: int, k: int, *, stride: int, transpose: bool, init, name: str, dtype) -> nn.Module:
    """A k x k convolution module in formulation ``impl`` ("xla" or "explicit", resolved)."""
    if impl == "explicit":
        return Conv(features, k, stride, transpose, kernel_init=init, bias_init=init, dtype=dtype, name=name)
    if transpose:
        return nn.ConvTranspose(features, (k, k), strides=(k, k), padding="VALID", kernel_init=init,
                                bias_init=init, dtype=dtype, name=name)
    return nn.Conv(features, (k, k), strides=(stride, stride), padding="SAME" if stride == 1 else "VALID",
                   kernel_init=init, bias_init=init, dtype=dtype, name=name)

