"""The VDM: loss terms against closed forms, learning, schedule gradients, network time, CFG
dropout and guidance, the sampler (determinism, and correctness with an exact score), vmap over
parameter sets, FLOP counting."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxconcept import config as C, data as D, vdm, nets

CFG = C.preset("vec_tiny")
M = CFG.model
SPEC = D.spec(CFG.data)
NET = nets.build(M, SPEC)
APPLY = vdm.make_apply(NET)
LN2 = math.log(2)


def _batch(n, seed=0):
    labels = jnp.asarray(np.resize(SPEC.train_classes, n))
    return D.sample(SPEC, D.params(CFG.data), jax.random.PRNGKey(seed), labels)


def _params(seed=0):
    return jax.jit(lambda k: vdm.init_params(NET, M, SPEC, k))(jax.random.PRNGKey(seed))


def _schedule(b=M.gamma_min, w=M.gamma_max - M.gamma_min):
    return {"net": {}, "gamma": {"b": jnp.float32(b), "w": jnp.float32(w)}}


def _zero(p, z, t, c, train, k):
    return jnp.zeros_like(z)


def _latent_bpd(x, g1):
    var1 = 1 / (1 + math.exp(-g1))
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    return float(np.mean(0.5 * (var1 + (1 - var1) * x ** 2 - math.log(var1) - 1))) / LN2


def _recon_bpd(g0, s):
    return (0.5 * math.exp(g0) / s ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)) / LN2


def test_loss_of_a_zero_network_matches_closed_form():
    for x in (_batch(4096)[0], jax.random.uniform(jax.random.PRNGKey(7), (256, 8, 8, 3))):
        cond = jnp.zeros((x.shape[0], 4))
        loss, terms = jax.jit(lambda x, c: vdm.loss_fn(_zero, M, _schedule(), x, c, jax.random.PRNGKey(1)))(x, cond)
        w = M.gamma_max - M.gamma_min
        assert abs(float(terms["diffusion"]) - 0.5 * w / LN2) < 0.04 * 0.5 * w / LN2  # E||eps||^2 = D
        np.testing.assert_allclose(float(terms["latent"]), _latent_bpd(x, M.gamma_max), rtol=1e-4, atol=1e-6)
        expect_rec = _recon_bpd(M.gamma_min, M.data_noise)  # ~4.9e3 bits/dim: sigma_0/alpha_0 >> data_noise
        assert abs(float(terms["recon"]) - expect_rec) < 0.04 * expect_rec
        np.testing.assert_allclose(float(loss), float(sum(terms.values())), rtol=1e-6)


def test_unet_loss_at_init_matches_closed_form():
    """At init the U-Net is the identity (zero conv_out + input residual): eps_hat = z_t, so
    E||eps_hat - eps||^2 = alpha_t^2 ||x||^2 + D (sigma_t - 1)^2, averaged over t ~ U(0, 1)."""
    cfg = C.preset("tiny")
    spec = D.spec(cfg.data)
    net = nets.build(cfg.model, spec)
    params = jax.jit(lambda k: vdm.init_params(net, cfg.model, spec, k))(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (64, *spec.x_shape))
    cond = jax.random.uniform(jax.random.PRNGKey(2), (64, spec.cond_dim))
    f = jax.jit(lambda p, k: vdm.loss_fn(vdm.make_apply(net), cfg.model, p, x, cond, k, train=True))
    terms = [f(params, jax.random.PRNGKey(i))[1] for i in range(4)]
    diff = np.mean([float(t["diffusion"]) for t in terms])
    g0, g1 = cfg.model.gamma_min, cfg.model.gamma_max
    g = g0 + (g1 - g0) * (np.arange(10000) + 0.5) / 10000  # midpoint quadrature in t
    a2, sig = 1 / (1 + np.exp(g)), np.sqrt(1 / (1 + np.exp(-g)))
    x2 = float(np.mean(np.asarray(x) ** 2))  # ||x||^2 / D
    expect = 0.5 * (g1 - g0) * float(np.mean(a2 * x2 + (sig - 1) ** 2)) / LN2
    assert abs(diff - expect) < 0.03 * expect, (diff, expect)
    np.testing.assert_allclose(float(terms[0]["latent"]), _latent_bpd(x, g1), rtol=1e-4, atol=1e-6)
    assert all(np.isfinite(float(v)) for t in terms for v in t.values())


def test_loss_decreases_and_the_network_learns():
    x, c = _batch(64)

    def train(params, trainable, steps=300):
        tx = optax.multi_transform({"on": optax.adam(3e-3), "off": optax.set_to_zero()},
                                   {"net": "on" if "net" in trainable else "off",
                                    "gamma": "on" if "gamma" in trainable else "off"})
        opt = tx.init(params)

        @jax.jit
        def step(carry, k):
            p, o = carry
            (loss, _), g = jax.value_and_grad(lambda p: vdm.loss_fn(APPLY, M, p, x, c, k), has_aux=True)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        (params, _), losses = jax.lax.scan(step, (params, opt), jax.random.split(jax.random.PRNGKey(1), steps))
        return params, np.asarray(losses)

    def diffusion_term(p):  # at fixed keys, eval mode
        f = jax.jit(lambda p, k: vdm.loss_fn(APPLY, M, p, x, c, k, train=False)[1]["diffusion"])
        return np.mean([float(f(p, jax.random.PRNGKey(100 + i))) for i in range(16)])

    p0 = _params()
    _, losses = train(p0, ("net", "gamma"))
    assert np.isfinite(losses).all() and losses[-30:].mean() < 0.7 * losses[:30].mean()
    p_net, _ = train(p0, ("net",))  # schedule frozen: only the score network can lower the loss
    assert diffusion_term(p_net) < 0.8 * diffusion_term(p0)


def test_gradients_reach_the_schedule():
    x, c = _batch(32)
    g = jax.jit(jax.grad(lambda p: vdm.loss_fn(APPLY, M, p, x, c, jax.random.PRNGKey(0))[0]))(_params())
    assert abs(float(g["gamma"]["b"])) > 0 and abs(float(g["gamma"]["w"])) > 0
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    assert float(g["gamma"]["b"]) > 0  # the reconstruction term pulls gamma_0 (hence b) down


def test_network_time_uses_the_configured_range_and_antithetic_times():
    seen = {}

    def spy(p, z, t, c, train, k):
        seen["t"], seen["c"] = t, c
        return jnp.zeros_like(z)

    x, c = _batch(16)
    vdm.loss_fn(spy, M, _schedule(b=-7.0, w=-20.0), x, c, jax.random.PRNGKey(3))  # learned != configured
    g = M.gamma_min + np.asarray(seen["t"]) * (M.gamma_max - M.gamma_min)  # invert the configured scaling
    t = np.sort((g + 7.0) / 20.0)  # then the learned schedule gamma = b + |w| t
    assert 0 <= t[0] < 1 / 16 and t[-1] < 1
    np.testing.assert_allclose(np.diff(t), 1 / 16, atol=1e-5)  # one time per stratum
    np.testing.assert_array_equal(seen["c"], c)  # p_cfg = 0: conditioning untouched


def test_cfg_dropout_rate_inside_the_loss():
    seen = {}

    def spy(p, z, t, c, train, k):
        seen["c"] = c
        return jnp.zeros_like(z)

    n, p_cfg = 20000, 0.2
    x, c = jnp.zeros((n, 3)), jax.random.uniform(jax.random.PRNGKey(0), (n, 4))
    null = D.null_cond(SPEC)
    vdm.loss_fn(spy, M, _schedule(), x, c, jax.random.PRNGKey(1), p_cfg=p_cfg, null_cond=null)
    out = np.asarray(seen["c"])
    dropped = np.all(out == -1, axis=1)
    assert abs(dropped.mean() - p_cfg) < 0.015  # ~5 standard errors
    np.testing.assert_array_equal(out[~dropped], np.asarray(c)[~dropped])
    other = vdm.drop_cond(c, jax.random.PRNGKey(2), p_cfg, null)
    assert not np.array_equal(np.all(np.asarray(other) == -1, axis=1), dropped)  # the key decides


def test_guidance_combines_conditional_and_null_predictions():
    def fake(p, z, t, c, train, k):  # eps depends on the prompt only
        return jnp.broadcast_to(c[:, :1], z.shape)

    z, cond = jnp.zeros((3, 3)), jnp.full((3, 4), 2.0)
    eps = vdm.eps_guided(fake, M, _schedule(), z, jnp.float32(0.0), cond, 3.0, D.null_cond(SPEC))
    np.testing.assert_allclose(eps, -1.0 + 3.0 * (2.0 - (-1.0)))  # the reference: null + w (cond - null)
    plain = vdm.eps_guided(fake, M, _schedule(), z, jnp.float32(0.0), cond, 1.0, None)
    np.testing.assert_allclose(plain, 2.0)
    uncond = vdm.eps_guided(fake, M, _schedule(), z, jnp.float32(0.0), cond, 0.0, D.null_cond(SPEC))
    np.testing.assert_allclose(uncond, -1.0)


def test_sampler_returns_z0_as_the_reference_or_the_decoder_mean():
    params = _params()
    cond = jnp.zeros((4, SPEC.cond_dim))
    kw = dict(x_shape=SPEC.x_shape, n_steps=4)
    z0 = vdm.sample(APPLY, M, params, cond, jax.random.PRNGKey(1), **kw)
    mean = vdm.sample(APPLY, M, params, cond, jax.random.PRNGKey(1), output="mean", **kw)
    alpha0 = np.sqrt(1 / (1 + np.exp(float(vdm.gamma(params, 0.0)))))
    np.testing.assert_allclose(np.asarray(mean), np.asarray(z0) / alpha0, rtol=1e-5)
    assert abs(1 / alpha0 - 1) > 1e-3  # the two differ (0.34 % at gamma_0 = -5)


def test_eval_loss_uses_guidance_like_the_reference():
    def fake(p, z, t, c, train, k):
        return jnp.broadcast_to(c[:, :1], z.shape)
    x, c = jnp.zeros((4, 3)), jnp.full((4, 4), 2.0)
    kw = dict(train=False, null_cond=D.null_cond(SPEC))
    plain = vdm.loss_terms(fake, M, _schedule(), x, c, jax.random.PRNGKey(0), **kw)["diffusion"]
    guided = vdm.loss_terms(fake, M, _schedule(), x, c, jax.random.PRNGKey(0), w_cfg=3.0, **kw)["diffusion"]
    assert not np.allclose(plain, guided)
    again = vdm.loss_terms(fake, M, _schedule(), x, jnp.full((4, 4), 8.0), jax.random.PRNGKey(0), **kw)
    np.testing.assert_allclose(guided, again["diffusion"], rtol=1e-6)  # -1 + 3 (2 + 1) = 8


def test_sampler_deterministic_given_key():
    params = _params()
    cond = jax.random.uniform(jax.random.PRNGKey(9), (5, SPEC.cond_dim))
    kw = dict(x_shape=SPEC.x_shape, n_steps=8)
    run = jax.jit(lambda p, k, w: vdm.sample(APPLY, M, p, cond, k, w_cfg=w, null_cond=D.null_cond(SPEC), **kw),
                  static_argnums=2)
    a, b, c = run(params, jax.random.PRNGKey(3), 0.0), run(params, jax.random.PRNGKey(3), 0.0), run(params, jax.random.PRNGKey(4), 0.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, *SPEC.x_shape) and a.dtype == jnp.float32 and not np.allclose(a, c)
    g = run(params, jax.random.PRNGKey(3), 3.0)
    assert np.isfinite(np.asarray(g)).all() and not np.allclose(a, g)


def test_sampler_with_the_exact_score_reproduces_a_gaussian():
    """For x ~ N(mu, s^2 I), E[eps | z_t] = sigma (z_t - alpha mu) / (alpha^2 s^2 + sigma^2); the
    ancestral sampler driven by it must return N(mu, s^2), better with more steps."""
    mu, s = 0.3, 0.5

    def exact(p, z, t, c, train, k):
        g = M.gamma_min + t * (M.gamma_max - M.gamma_min)
        a2, s2 = jax.nn.sigmoid(-g)[:, None], jax.nn.sigmoid(g)[:, None]
        return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * mu) / (a2 * s * s + s2)

    def stats(n_steps):
        f = jax.jit(lambda k: vdm.sample(exact, M, _schedule(), jnp.zeros((20000, 4)), k, x_shape=(3,),
                                               n_steps=n_steps))
        x = np.asarray(f(jax.random.PRNGKey(0)))
        return x.mean(), x.std()

    m200, s200 = stats(200)
    _, s20 = stats(20)
    assert abs(m200 - mu) < 0.01 and abs(s200 - s) < 0.02 * s
    assert abs(s200 - s) < abs(s20 - s)  # discretisation error shrinks with the step count


def test_vmap_over_parameter_sets_equals_separate_calls():
    x, c = _batch(16)
    stack = jax.jit(jax.vmap(lambda k: vdm.init_params(NET, M, SPEC, k)))(jax.random.split(jax.random.PRNGKey(0), 4))
    f = jax.jit(lambda p: vdm.loss_fn(APPLY, M, p, x, c, jax.random.PRNGKey(5), train=False)[0])
    losses = jax.jit(jax.vmap(f))(stack)
    for i in range(4):
        np.testing.assert_allclose(losses[i], f(jax.tree.map(lambda a: a[i], stack)), rtol=1e-5)
    assert len(set(np.asarray(losses).round(6).tolist())) == 4


def test_step_flops_scale_with_the_batch():
    f32, f64 = (vdm.step_flops(NET, M, SPEC, b) for b in (32, 64))
    assert f32 > 0 and 1.7 < f64 / f32 < 2.3


def test_guidance_mix_traced_weight_gives_the_numbers_of_a_fixed_one():
    cond, null = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
    for w in (0.0, 1.0, 2.5):
        traced = jax.jit(vdm.guidance_mix)(cond, null, jnp.float32(w))
        np.testing.assert_array_equal(traced, vdm.guidance_mix(cond, null, w))
    np.testing.assert_allclose(vdm.guidance_mix(cond, null, 2.5), null + 2.5 * (cond - null))


def test_sampler_args_are_the_eval_configs_and_fit_the_sampler():
    import inspect

    from jaxconcept.vdm import sampler_args

    ec = C.EvalConfig(sampler_steps=7, w_cfg=2.0, sampler_output="mean")
    kw = sampler_args(ec, SPEC, loop_safe=False)
    assert set(kw) <= set(inspect.signature(vdm.sample).parameters)
    assert (kw["x_shape"], kw["n_steps"], kw["w_cfg"], kw["output"], kw["loop_safe"]) == (SPEC.x_shape, 7, 2.0, "mean",
                                                                                           False)
    assert sampler_args(ec, SPEC, loop_safe=True, w_cfg=0.5)["w_cfg"] == 0.5
