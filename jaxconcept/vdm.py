"""The variational diffusion model (Kingma et al. 2021) as pure functions of an ``apply_fn``.

The model's functions do not know what the network is (only ``train_step_flops`` builds the
configured one, to count a training step's FLOPs): ``apply_fn(net_params, x, t, cond, train,
key)`` returns eps_hat, where t is the network time (gamma(t) - gamma_min) / (gamma_max - gamma_min), computed
with the *configured* gamma range (docs/study.md A2).

    params = {"net": ..., "gamma": {"b": f32[], "w": f32[]}}   # learned linear log-SNR schedule

gamma(t) = b + |w| t;  alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma);  z_t = alpha x + sigma eps.

The model settings these functions read (``model_cfg``: gamma_min, gamma_max, data_noise,
init_scale) come from a ``config.ModelConfig`` or a ``ModelSettings`` whose values may be traced
per-member scalars (a stack of members differing in them, ``step.model_settings``); likewise
``p_cfg`` and ``w_cfg`` may be traced. A Python number is a setting fixed in the program, and its
shortcuts (p_cfg 0: no conditioning dropout; w_cfg 1: one network call) are taken only then; a
traced value gives the same numbers for those values by selecting, not by shortcut.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxconcept import config as C, data as D, nets


def _number(x) -> bool:
    """``x`` is a Python number, fixed when the program is traced (not a traced array)."""
    return isinstance(x, (int, float))


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The model settings the diffusion functions read, each a number or a traced f32[]."""

    gamma_min: object
    gamma_max: object
    data_noise: float  # fixed per program (a group's)
    init_scale: object = 1.0


def make_apply(net):
    """apply_fn(net_params, x, t, cond, train, key) -> eps_hat for a Flax score network
    (``key`` feeds dropout when ``train``)."""
    def apply_fn(net_params, x, t, cond, train, key):
        return net.apply({"params": net_params}, x, t, cond, train, rngs={"dropout": key})
    return apply_fn


def init_params(net, model_cfg, spec, key) -> dict:
    """Initial parameters: the network's (every initial weight times ``model_cfg.init_scale``, as
    the reference scales all its parameters) and the schedule's b = gamma_min, w = gamma_max -
    gamma_min.

    Returns:
      {"net": net_params, "gamma": {"b": f32[], "w": f32[]}}, all float32.
    """
    x = jnp.zeros((1, *spec.x_shape), jnp.float32)
    p = net.init(key, x, jnp.zeros((1,), jnp.float32), jnp.zeros((1, spec.cond_dim), jnp.float32), False)["params"]
    scale = model_cfg.init_scale
    if not (_number(scale) and scale == 1.0):  # a traced scale of 1 multiplies by 1: the same numbers
        p = jax.tree.map(lambda a: a * scale, p)
    return {"net": p, "gamma": {"b": jnp.asarray(model_cfg.gamma_min, jnp.float32),
                                "w": jnp.asarray(model_cfg.gamma_max - model_cfg.gamma_min, jnp.float32)}}


def gamma(params, t):
    """Learned linear log-SNR schedule gamma(t) = b + |w| t (any shape of t)."""
    g = params["gamma"]
    return g["b"] + jnp.abs(g["w"]) * t


def net_time(model_cfg, g):
    """The network's time input (g - gamma_min) / (gamma_max - gamma_min), configured range."""
    return (g - model_cfg.gamma_min) / (model_cfg.gamma_max - model_cfg.gamma_min)


def _bcast(a, x):
    """a [B] -> [B, 1, ..., 1] to broadcast against x [B, ...] (rank promotion raises)."""
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _null(null_cond, cond):
    return -jnp.ones(cond.shape[1:], cond.dtype) if null_cond is None else jnp.asarray(null_cond, cond.dtype)


def drop_cond(cond, key, p: float, null_cond=None):
    """Classifier-free guidance dropout: each row of cond [B, cond_dim] becomes ``null_cond``
    (default all -1) with probability p."""
    drop = jax.random.bernoulli(key, p, (cond.shape[0],))  # [B]
    return jnp.where(drop[:, None], _null(null_cond, cond)[None, :], cond)


def loss_terms(apply_fn, model_cfg, params, x, cond, key, *, train=True, p_cfg=0.0, null_cond=None,
               n_valid=None, draws=None, w_cfg=1.0) -> dict:
    """Per-example VDM loss terms in bits per dimension, each [B].

    diffusion: 1/2 gamma'(t) ||eps_hat - eps||^2 with antithetic t (t_i = t_0 + i/n mod 1);
    latent:    KL(q(z_1|x) || N(0, I));
    recon:     -log N(x; z_0/alpha_0, data_noise^2) with z_0 ~ q(z_0|x) (one draw).

    Args:
      n_valid: the number of real examples when the batch is padded (a short last batch of an
        epoch): they are the first ``n_valid`` rows and the time grid spans them (default: B).
      draws: optional {"t": [B], "eps": x-shaped, "eps_0": x-shaped} replacing the random draws
        of times, diffusion noise and reconstruction noise (parity tests against the reference).
      w_cfg: in eval mode (``train=False``), predict eps with guidance weight w_cfg (``eps_guided``),
        as the reference's validation and test losses do.
    """
    b = x.shape[0]
    d = math.prod(x.shape[1:])
    axes = tuple(range(1, x.ndim))
    x = x.astype(jnp.float32)
    k_t, k_eps, k_0, k_drop, k_net = jax.random.split(key, 5)
    if not (_number(p_cfg) and p_cfg == 0.0):  # a traced p of 0 drops no row: bernoulli(0) is never true
        cond = drop_cond(cond, k_drop, p_cfg, null_cond)
    draws = draws or {}
    n = b if n_valid is None else n_valid

    # [B], stratified over [0, 1) across the n real examples
    t = draws["t"] if "t" in draws else jnp.mod(jax.random.uniform(k_t, ()) + jnp.arange(b) / n, 1.0)
    g_t = gamma(params, t)  # [B]
    eps = draws["eps"] if "eps" in draws else jax.random.normal(k_eps, x.shape)
    z_t = _bcast(jnp.sqrt(jax.nn.sigmoid(-g_t)), x) * x + _bcast(jnp.sqrt(jax.nn.sigmoid(g_t)), x) * eps
    eps_hat = apply_fn(params["net"], z_t, net_time(model_cfg, g_t), cond, train, k_net)
    if not train and not (_number(w_cfg) and w_cfg == 1.0):
        null = jnp.broadcast_to(_null(null_cond, cond), cond.shape)
        eps_null = apply_fn(params["net"], z_t, net_time(model_cfg, g_t), null, train, k_net)
        eps_hat = guidance_mix(eps_hat, eps_null, w_cfg)
    assert eps_hat.shape == x.shape, (eps_hat.shape, x.shape)
    dgamma_dt = jnp.abs(params["gamma"]["w"])  # linear schedule: gamma'(t) = |w| (learned through)
    diffusion = 0.5 * dgamma_dt * jnp.sum((eps_hat - eps) ** 2, axis=axes)

    var_1 = jax.nn.sigmoid(gamma(params, jnp.float32(1.0)))  # sigma_1^2
    latent = 0.5 * jnp.sum(var_1 + (1.0 - var_1) * x ** 2 - jnp.log(var_1) - 1.0, axis=axes)

    # z_0 / alpha_0 = x + (sigma_0 / alpha_0) eps_0 and sigma_0 / alpha_0 = exp(gamma_0 / 2)
    eps_0 = draws["eps_0"] if "eps_0" in draws else jax.random.normal(k_0, x.shape)
    err = jnp.exp(0.5 * gamma(params, jnp.float32(0.0))) * eps_0
    s = model_cfg.data_noise
    recon = jnp.sum(0.5 * (err / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi), axis=axes)

    bpd = 1.0 / (d * math.log(2.0))
    return {"diffusion": diffusion * bpd, "latent": latent * bpd, "recon": recon * bpd}


def loss_fn(apply_fn, model_cfg, params, x, cond, key, *, train=True, p_cfg=0.0, null_cond=None, n_valid=None,
            w_cfg=1.0):
    """VDM loss (negative ELBO) in bits per dimension, mean over the batch's real examples.

    Args:
      apply_fn: ``make_apply(net)`` or an intervened equivalent.
      model_cfg: gamma_min, gamma_max (network time), data_noise.
      params: {"net", "gamma"}.
      x: [B, *x_shape] data as is (images in [0, 1]); B even keeps the time grid symmetric.
      cond: [B, cond_dim].
      key: PRNG key for times, noise, CFG dropout and network dropout.
      train: network in training mode (dropout).
      p_cfg: probability of replacing a row's cond by ``null_cond`` (default all -1).
      n_valid: real examples (the first rows) of a padded batch; default all B.
      w_cfg: guidance weight of the eps prediction in eval mode (see ``loss_terms``).
    Returns:
      (loss, {"diffusion", "latent", "recon"}), each term a mean in bits/dim.
    """
    terms = loss_terms(apply_fn, model_cfg, params, x, cond, key, train=train, p_cfg=p_cfg,
                       null_cond=null_cond, n_valid=n_valid, w_cfg=w_cfg)
    if n_valid is None:
        terms = jax.tree.map(jnp.mean, terms)
    else:
        w = (jnp.arange(x.shape[0]) < n_valid).astype(jnp.float32)  # [B]
        terms = jax.tree.map(lambda v: jnp.sum(w * v) / jnp.maximum(jnp.sum(w), 1.0), terms)
    return terms["diffusion"] + terms["latent"] + terms["recon"], terms


def eps_guided(apply_fn, model_cfg, params, z, g, cond, w_cfg=1.0, null_cond=None):
    """eps_hat at log-SNR g (scalar) in eval mode, classifier-free guided as the reference does:
    eps(null) + w_cfg (eps(cond) - eps(null)). w_cfg = 1 is plain conditional sampling (one
    network call); 0 is unconditional. Two separate calls (not one of batch 2N), so interventions
    whose values are per example still broadcast. A traced ``w_cfg`` makes both calls and selects
    eps(cond) where it is 1 and eps(null) where it is 0: the numbers of those shortcuts."""
    t_in = jnp.full((z.shape[0],), net_time(model_cfg, g), jnp.float32)
    key = jax.random.PRNGKey(0)  # unused: no dropout in eval mode
    if _number(w_cfg) and w_cfg == 1.0:
        return apply_fn(params["net"], z, t_in, cond, False, key)
    null = jnp.broadcast_to(_null(null_cond, cond), cond.shape)
    eps_null = apply_fn(params["net"], z, t_in, null, False, key)
    if _number(w_cfg) and w_cfg == 0.0:
        return eps_null
    return guidance_mix(apply_fn(params["net"], z, t_in, cond, False, key), eps_null, w_cfg)


def guidance_mix(eps_cond, eps_null, w_cfg):
    """Classifier-free guidance (Ho & Salimans 2022, as the reference's sampler):
    eps(null) + w_cfg (eps(cond) - eps(null)); eps_cond, eps_null of one shape, w_cfg a number or
    a traced scalar. A traced w_cfg selects eps_cond where it is 1 and eps_null where it is 0: the
    numbers of the one-call shortcuts a Python number takes (``eps_guided``)."""
    guided = eps_null + w_cfg * (eps_cond - eps_null)
    if _number(w_cfg):
        return guided
    return jnp.where(w_cfg == 1.0, eps_cond, jnp.where(w_cfg == 0.0, eps_null, guided))


def sample(apply_fn, model_cfg, params, cond, key, *, x_shape, n_steps, w_cfg=1.0, null_cond=None,
           output: str = "z0", loop_safe: bool = True):
    """Ancestral VDM sampler: t from 1 to 0 on a uniform grid of ``n_steps`` steps, one lax.scan.

    z_1 ~ N(0, I); for t -> s: z_s = alpha_s/alpha_t (z_t - c sigma_t eps_hat) + sigma_s sqrt(c) n,
    c = -expm1(gamma_s - gamma_t). Deterministic given ``key``.

    Args:
      cond: [N, cond_dim] prompts.
      x_shape: shape of one example.
      n_steps: sampler steps.
      w_cfg: guidance weight, eps(null) + w (eps(cond) - eps(null)) (1: plain conditional sampling).
      null_cond: the unconditional prompt for guidance (default all -1).
      output: "z0" returns z_0, as the reference does; "mean" the decoder's mean z_0 / alpha_0.
      loop_safe: False traces the steps as a Python loop instead of the scan, for a network slow
        inside XLA loops (``nets.loop_safe``: the caller decides once, where the sampler is built).
    Returns:
      x [N, *x_shape] float32.
    Raises:
      ValueError: an unknown ``output``.
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

    if not loop_safe:
        for i in range(n_steps):
            z, _ = step(z, jnp.int32(i))
    else:
        z, _ = jax.lax.scan(step, z, jnp.arange(n_steps))
    if output == "mean":
        return z / jnp.sqrt(jax.nn.sigmoid(-gamma(params, jnp.float32(0.0))))
    if output != "z0":
        raise ValueError(f"output={output!r} is invalid: allowed z0, mean")
    return z


def step_flops(net, model_cfg, spec, batch_size: int, *, p_cfg: float = 0.0) -> float:
    """FLOPs of one training step (loss forward + backward) of one model at ``batch_size``, from
    XLA's cost analysis of the lowered jit(value_and_grad(loss)) (before XLA's optimisations: no
    compile, a second instead of a minute for the reference U-Net on a GPU; the compiled program's
    count differs by a few per cent with the backend's rewrites); shapes only, no real data."""
    apply_fn = make_apply(net)
    params = jax.eval_shape(lambda k: init_params(net, model_cfg, spec, k), jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((batch_size, *spec.x_shape), jnp.float32)
    c = jax.ShapeDtypeStruct((batch_size, spec.cond_dim), jnp.float32)

    def f(p, x, c, k):
        return jax.value_and_grad(lambda p: loss_fn(apply_fn, model_cfg, p, x, c, k, p_cfg=p_cfg)[0])(p)

    lowered = jax.jit(f).lower(params, x, c, jax.random.PRNGKey(0))
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()  # None where a backend has no analysis
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def train_step_flops(cfg) -> float:
    """``step_flops`` of the first member of ``cfg`` (a ``config.Config``) at train.batch_size."""
    spec = D.spec(C.members(cfg)[0].data)
    return step_flops(nets.build(cfg.model, spec), cfg.model, spec, cfg.train.batch_size, p_cfg=cfg.train.p_cfg)


def sampler_args(eval_cfg: C.EvalConfig, spec: D.DataSpec, *, loop_safe: bool, w_cfg=None) -> dict:
    """The keyword arguments of ``sample`` an evaluation config sets: x_shape, n_steps
    (``eval.sampler_steps``), w_cfg (``eval.w_cfg``, or a member's traced value), null_cond (the
    data's unconditional prompt), output (``eval.sampler_output``) and loop_safe."""
    return dict(x_shape=spec.x_shape, n_steps=eval_cfg.sampler_steps, w_cfg=eval_cfg.w_cfg if w_cfg is None else w_cfg,
                null_cond=D.null_cond(spec), output=eval_cfg.sampler_output, loop_safe=loop_safe)
