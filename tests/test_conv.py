"""The "explicit" convolutions (jaxconcept.nets.conv) equal Flax's / lax's, forward and gradients,
for every kind the U-Net uses; the U-Net built either way has the same parameters and output."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import config as C, data as D, vdm, nets
from jaxconcept.nets import conv as convs, layers

TOL = 2e-5  # relative to the largest magnitude: float32 with different summation orders


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() / scale < tol, (np.abs(a - b).max(), scale)


# (kernel, stride, transposed, input [B, H, W, C_in], C_out): the kinds and shapes the U-Net uses
KINDS = {
    "3x3 same": (3, 1, False, (2, 8, 8, 5), 7),
    "3x3 same, 3 channels in": (3, 1, False, (2, 16, 16, 3), 8),
    "1x1": (1, 1, False, (2, 8, 8, 6), 4),
    "2x2 stride 2 valid": (2, 2, False, (2, 8, 8, 4), 6),
    "2x2 stride 2 valid, odd size": (2, 2, False, (2, 7, 9, 4), 6),
    "2x2 transposed": (2, 2, True, (2, 4, 4, 6), 3),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_explicit_equals_xla_forward_and_gradients(kind):
    k, stride, transpose, shape, out = KINDS[kind]
    init = nn.initializers.normal(0.3)
    ref = convs.make("xla", out, k, stride=stride, transpose=transpose, init=init, name="c", dtype=jnp.float32)
    new = convs.make("explicit", out, k, stride=stride, transpose=transpose, init=init, name="c", dtype=jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    p_ref, p_new = ref.init(jax.random.PRNGKey(0), x), new.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(np.asarray, p_ref).keys() == p_new.keys()
    jax.tree.map(np.testing.assert_array_equal, p_ref, p_new)  # same names, shapes, initial values
    y_ref = ref.apply(p_ref, x)
    _close(new.apply(p_new, x), y_ref)
    w = jax.random.normal(jax.random.PRNGKey(2), y_ref.shape)  # a loss with every output weighted apart

    def grads(m):
        return jax.grad(lambda p, x: jnp.sum(w * jnp.tanh(m.apply(p, x))), argnums=(0, 1))(p_ref, x)
    (gp_ref, gx_ref), (gp_new, gx_new) = grads(ref), grads(new)
    _close(gx_new, gx_ref)
    jax.tree.map(_close, gp_new, gp_ref)


def test_explicit_gradients_inside_scan_equal_top_level():
    """Inside lax.scan (the reason for the formulation) the gradients are the same numbers."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    w = 0.2 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4))

    def f(w, x):
        return jnp.sum(jax.lax.scan(lambda h, _: (jnp.tanh(convs.conv_same(h, w)), None), x, None, length=3)[0])

    def g(w, x):
        for _ in range(3):
            x = jnp.tanh(convs.conv_same(x, w))
        return jnp.sum(x)
    gs, gt = jax.jit(jax.grad(f))(w, x), jax.jit(jax.grad(g))(w, x)
    _close(gs, gt, 1e-6)


@pytest.mark.parametrize("shape", [(1,), (5,), (2, 7, 3), (64, 16, 16, 16)])
def test_dropout_masks_are_jax_random_bernoulli_bit_for_bit(shape):
    key = jax.random.fold_in(jax.random.PRNGKey(3), len(shape))
    np.testing.assert_array_equal(layers.threefry_bits(key, shape), jax.random.bits(key, shape))
    np.testing.assert_array_equal(layers.bernoulli(key, 0.9, shape), jax.random.bernoulli(key, 0.9, shape))
    typed = jax.random.key(7)
    np.testing.assert_array_equal(layers.threefry_bits(typed, shape), jax.random.bits(typed, shape))


def test_resolve_and_errors():
    assert convs.resolve("auto", "cpu") == "explicit" and convs.resolve("auto", "gpu") == "xla"
    assert convs.resolve("xla", "cpu") == "xla" and convs.resolve("explicit", "tpu") == "explicit"
    assert not convs.loop_safe("xla", "cpu") and convs.loop_safe("xla", "gpu") and convs.loop_safe("auto", "cpu")
    with pytest.raises(ValueError, match=r"^model.conv='fft' is invalid: allowed one of auto, xla, explicit$"):
        convs.resolve("fft")


def test_unet_explicit_equals_xla():
    """The tiny U-Net (every kind of conv, attention's 1x1s, GroupNorm+GELU, dropout) built both
    ways: the same parameter tree from the same key, and eps_hat (in training mode: the same
    dropout masks) and the loss's gradients equal to float32 rounding."""
    out = {}
    for impl in ("xla", "explicit"):
        cfg = C.override(C.preset("tiny"), [f'model.conv="{impl}"', "model.dropout=0.3"])
        spec = D.spec(cfg.data)
        net = nets.build(cfg.model, spec)
        params = jax.jit(lambda k: vdm.init_params(net, cfg.model, spec, k))(jax.random.PRNGKey(0))  # noqa: B023
        # every conv non-zero (conv_1 and conv_out start at zero and would hide their blocks)
        params = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), params)
        x = jax.random.uniform(jax.random.PRNGKey(1), (4, *spec.x_shape))
        cond = jax.random.uniform(jax.random.PRNGKey(2), (4, spec.cond_dim))
        apply_fn = vdm.make_apply(net)
        loss = lambda p: vdm.loss_fn(apply_fn, cfg.model, p, x, cond, jax.random.PRNGKey(3))[0]  # noqa: E731
        eps = jax.jit(apply_fn, static_argnums=4)(params["net"], x, jnp.full((4,), 0.3), cond, True,
                                                  jax.random.PRNGKey(4))  # jitted: one program, not one per op
        out[impl] = (params, eps, jax.jit(jax.grad(loss))(params))
    (p0, e0, g0), (p1, e1, g1) = out["xla"], out["explicit"]
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    jax.tree.map(np.testing.assert_array_equal, p0, p1)
    _close(e1, e0)
    # per leaf, relative to the largest gradient anywhere (some leaves' gradients are ~0 up to rounding)
    scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g0))
    errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale, g1, g0)
    assert max(jax.tree.leaves(errs)) < TOL, errs
