"""The variational diffusion model (Kingma et al. 2021) as pure functions of an ``apply_fn``.

Nothing here knows what the network is: ``apply_fn(net_params, x, t, cond, train, key)`` returns
eps_hat, where t is the network time (gamma(t) - gamma_min) / (gamma_max - gamma_min) in [0, 1].

    params = {"net": ..., "gamma": {"b": f32[], "w": f32[]}}   # learned linear log-SNR schedule
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def make_apply(net):
    """apply_fn for a Flax score network (dropout draws from ``key`` when training)."""
    def apply_fn(net_params, x, t, cond, train, key):
        return net.apply({"params": net_params}, x, t, cond, train, rngs={"dropout": key})
    return apply_fn


def init_params(net, model_cfg, spec, key) -> dict:
    """Network parameters (every initial weight times ``init_scale``) and the schedule's b, w."""
    x = jnp.zeros((1, *spec.x_shape))
    p = net.init(key, x, jnp.zeros((1,)), jnp.zeros((1, spec.cond_dim)), False)["params"]
    if model_cfg.init_scale != 1.0:
        p = jax.tree.map(lambda a: a * model_cfg.init_scale, p)
    return {"net": p, "gamma": {"b": jnp.float32(model_cfg.gamma_min),
                                "w": jnp.float32(model_cfg.gamma_max - model_cfg.gamma_min)}}


def gamma(params, t):
    """Learned linear log-SNR schedule gamma(t) = b + |w| t."""
    g = params["gamma"]
    return g["b"] + jnp.abs(g["w"]) * t


def net_time(model_cfg, g):
    """The network's time input, scaled with the *configured* gamma range."""
    return (g - model_cfg.gamma_min) / (model_cfg.gamma_max - model_cfg.gamma_min)


def _bcast(a, x):
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def drop_cond(cond, key, p: float, null_cond):
    """Classifier-free guidance: replace each row by ``null_cond`` with probability p."""
    drop = jax.random.bernoulli(key, p, (cond.shape[0],))
    return jnp.where(drop[:, None], null_cond[None, :], cond)


def loss_fn(apply_fn, model_cfg, params, x, cond, key, *, train=True, p_cfg=0.0, null_cond=None):
    """VDM loss in bits per dimension, batch mean.

    Per example: diffusion term 1/2 gamma'(t) ||eps_hat - eps||^2 (antithetic t over the batch),
    latent term KL(q(z_1|x) || N(0, I)), reconstruction -log N(x; z_0/alpha_0, data_noise^2).

    Returns:
      (loss, {"diffusion", "latent", "recon"}), each term a batch mean in bits/dim.
    """
    b = x.shape[0]
    d = math.prod(x.shape[1:])
    k_t, k_eps, k_0, k_drop, k_net = jax.random.split(key, 5)
    if p_cfg > 0.0:
        cond = drop_cond(cond, k_drop, p_cfg, null_cond)
    t0 = jax.random.uniform(k_t, ())
    t = jnp.mod(t0 + jnp.arange(b) / b, 1.0)  # antithetic (stratified) times [B]
    g_t = gamma(params, t)
    eps = jax.random.normal(k_eps, x.shape)
    z_t = _bcast(jnp.sqrt(jax.nn.sigmoid(-g_t)), x) * x + _bcast(jnp.sqrt(jax.nn.sigmoid(g_t)), x) * eps
    eps_hat = apply_fn(params["net"], z_t, net_time(model_cfg, g_t), cond, train, k_net)
    axes = tuple(range(1, x.ndim))
    dgamma = jnp.abs(params["gamma"]["w"])  # gamma'(t) of the linear schedule
    diffusion = 0.5 * dgamma * jnp.sum((eps_hat - eps) ** 2, axis=axes)

    g_1 = gamma(params, jnp.ones(()))
    var_1 = jax.nn.sigmoid(g_1)
    mean_1 = jnp.sqrt(jax.nn.sigmoid(-g_1)) * x
    latent = 0.5 * jnp.sum(var_1 + mean_1 ** 2 - jnp.log(var_1) - 1.0, axis=axes)

    g_0 = gamma(params, jnp.zeros(()))
    # z_0 / alpha_0 = x + (sigma_0 / alpha_0) eps_0, so the decoder's error is that noise term
    err = jnp.exp(0.5 * g_0) * jax.random.normal(k_0, x.shape)
    s = model_cfg.data_noise
    recon = jnp.sum(0.5 * (err / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi), axis=axes)

    bpd = 1.0 / (d * math.log(2.0))
    terms = {"diffusion": jnp.mean(diffusion) * bpd, "latent": jnp.mean(latent) * bpd, "recon": jnp.mean(recon) * bpd}
    return terms["diffusion"] + terms["latent"] + terms["recon"], terms


def eps_guided(apply_fn, model_cfg, params, z, g, cond, w_cfg, null_cond):
    """eps_hat at log-SNR g; with w_cfg > 0, (1 + w) eps(cond) - w eps(null)."""
    t_in = jnp.full((z.shape[0],), net_time(model_cfg, g))
    eps = apply_fn(params["net"], z, t_in, cond, False, jax.random.PRNGKey(0))
    if w_cfg:
        null = jnp.broadcast_to(null_cond, cond.shape)
        eps = (1.0 + w_cfg) * eps - w_cfg * apply_fn(params["net"], z, t_in, null, False, jax.random.PRNGKey(0))
    return eps


def sample(apply_fn, model_cfg, params, cond, key, *, x_shape, n_steps, w_cfg=0.0, null_cond=None):
    """Ancestral VDM sampler: t from 1 to 0 on a uniform grid of ``n_steps``, one lax.scan.

    Returns x = z_0 / alpha_0, [N, *x_shape]; deterministic given ``key``.
    """
    n = cond.shape[0]
    k_init, k_steps = jax.random.split(key)
    z = jax.random.normal(k_init, (n, *x_shape))

    def step(z, i):
        t, s = (n_steps - i) / n_steps, (n_steps - i - 1) / n_steps
        g_t, g_s = gamma(params, t), gamma(params, s)
        eps = eps_guided(apply_fn, model_cfg, params, z, g_t, cond, w_cfg, null_cond)
        c = -jnp.expm1(g_s - g_t)
        mean = jnp.sqrt(jax.nn.sigmoid(-g_s) / jax.nn.sigmoid(-g_t)) * (z - c * jnp.sqrt(jax.nn.sigmoid(g_t)) * eps)
        noise = jax.random.normal(jax.random.fold_in(k_steps, i), z.shape)
        return mean + jnp.sqrt(c * jax.nn.sigmoid(g_s)) * noise, None

    z, _ = jax.lax.scan(step, z, jnp.arange(n_steps))
    return z / jnp.sqrt(jax.nn.sigmoid(-gamma(params, jnp.zeros(()))))


def train_step_flops(cfg) -> float:
    """FLOPs of one member's training step (forward + backward) at train.batch_size, from XLA."""
    from jaxconcept import config as C, data as D, nets

    spec = D.spec(C.members(cfg)[0].data)
    net = nets.build(cfg.model, spec)
    apply_fn = make_apply(net)
    params = jax.eval_shape(lambda k: init_params(net, cfg.model, spec, k), jax.random.PRNGKey(0))
    b = cfg.train.batch_size
    x = jax.ShapeDtypeStruct((b, *spec.x_shape), jnp.float32)
    c = jax.ShapeDtypeStruct((b, spec.cond_dim), jnp.float32)

    def f(p, x, c, k):
        return jax.value_and_grad(lambda p: loss_fn(apply_fn, cfg.model, p, x, c, k)[0])(p)

    cost = jax.jit(f).lower(params, x, c, jax.random.PRNGKey(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))
