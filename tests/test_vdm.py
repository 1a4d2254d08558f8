"""The VDM: loss at initialisation against its closed form, learning, schedule gradients, sampler, CFG."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxconcept import config as C, data as D, vdm, nets

CFG = C.preset("vec_tiny")
SPEC = D.spec(CFG.data)
NET = nets.build(CFG.model, SPEC)
APPLY = vdm.make_apply(NET)


def _batch(n=256, seed=0):
    labels = jnp.asarray(np.resize(SPEC.train_classes, n))
    return D.sample(SPEC, D.params(CFG.data), jax.random.PRNGKey(seed), labels)


def test_loss_of_a_zero_network_matches_closed_form():
    x, c = _batch(4096)
    params = vdm.init_params(NET, CFG.model, SPEC, jax.random.PRNGKey(0))
    zero = lambda p, z, t, cc, train, k: jnp.zeros_like(z)  # noqa: E731
    loss, terms = vdm.loss_fn(zero, CFG.model, params, x, c, jax.random.PRNGKey(1))
    d, ln2 = x.shape[1], math.log(2)
    g0, g1 = CFG.model.gamma_min, CFG.model.gamma_max
    w = g1 - g0
    s = CFG.model.data_noise
    var1 = 1 / (1 + math.exp(-g1))
    expect_diff = 0.5 * w / ln2  # E||eps||^2 = D
    expect_lat = float(np.mean(0.5 * (var1 + (1 - var1) * np.asarray(x) ** 2 - math.log(var1) - 1))) / ln2
    expect_rec = (0.5 * math.exp(g0) / s ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)) / ln2
    assert abs(float(terms["diffusion"]) - expect_diff) < 0.05 * expect_diff
    assert abs(float(terms["latent"]) - expect_lat) < 1e-3 + 0.01 * abs(expect_lat)
    assert abs(float(terms["recon"]) - expect_rec) < 0.05 * expect_rec
    np.testing.assert_allclose(float(loss), float(sum(terms.values())), rtol=1e-6)
    assert d == SPEC.x_shape[0]


def test_loss_decreases_and_schedule_gets_gradients():
    x, c = _batch(64)
    params = vdm.init_params(NET, CFG.model, SPEC, jax.random.PRNGKey(0))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def f(p, k):
        return vdm.loss_fn(APPLY, CFG.model, p, x, c, k)[0]

    g = jax.grad(f)(params, jax.random.PRNGKey(0))
    assert abs(float(g["gamma"]["b"])) > 0 and abs(float(g["gamma"]["w"])) > 0

    @jax.jit
    def step(p, o, k):
        loss, g = jax.value_and_grad(f)(p, k)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    losses = []
    for i in range(300):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert np.mean(losses[-30:]) < 0.7 * np.mean(losses[:30])


def test_sampler_deterministic_given_key_and_cfg():
    params = vdm.init_params(NET, CFG.model, SPEC, jax.random.PRNGKey(0))
    cond = jnp.ones((5, SPEC.cond_dim))
    kw = dict(x_shape=SPEC.x_shape, n_steps=8)
    a = vdm.sample(APPLY, CFG.model, params, cond, jax.random.PRNGKey(3), **kw)
    b = jax.jit(lambda p, k: vdm.sample(APPLY, CFG.model, p, cond, k, **kw))(params, jax.random.PRNGKey(3))
    c = vdm.sample(APPLY, CFG.model, params, cond, jax.random.PRNGKey(4), **kw)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.shape == (5, *SPEC.x_shape) and not np.allclose(a, c)
    null = D.null_cond(SPEC)
    g = vdm.sample(APPLY, CFG.model, params, cond, jax.random.PRNGKey(3), w_cfg=3.0, null_cond=null, **kw)
    assert np.isfinite(np.asarray(g)).all()


def test_cfg_dropout_rate():
    cond = jnp.ones((20000, SPEC.cond_dim))
    out = vdm.drop_cond(cond, jax.random.PRNGKey(0), 0.2, D.null_cond(SPEC))
    frac = float(jnp.mean(jnp.all(out == -1, axis=1)))
    assert abs(frac - 0.2) < 0.015
