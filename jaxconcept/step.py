"""One member: its optimiser, random streams, initial state, training batch, training step and
held-back loss. Nothing here knows about a model axis; ``stack`` maps these over the members.

    state = {"params", "opt", "step": i32[], "key": u32[2], "alive": bool[][, "ema"]}  # one member
    data  = dict(x_train [N, ...], c_train [N, cond_dim], x_val, c_val, x_test, c_test, ...)
    batch = dict(x [B, ...], c [B, cond_dim], n [])  # a host-fed training batch (data.HOST_FED kinds)

The train step is ``train_step``, the loss it differentiates ``diffusion.loss_fn``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxconcept import config as C, data as D, diffusion
from jaxconcept.data.batches import batch_indices, epoch_permutation


def optimizer(tc: C.TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (SPEC A2). The learning rate lives in the optimiser state
    (inject_hyperparams), so members may differ in it."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.inject_hyperparams(optax.adamw)(learning_rate=tc.lr, weight_decay=tc.weight_decay),
    )


def member_keys(seed) -> dict:
    """Every random stream of a member derives from its seed: init, data, batches, samples, and
    elicitation's samples (``elicit``; a stream of its own, so its keys never meet the others').
    ``seed`` may be traced. Returns {name: key [2] uint32}."""
    root = jax.random.PRNGKey(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "data", "train", "sample", "elicit"))}


def init_member(cfg: C.Config, spec: D.DataSpec, net, seed) -> dict:
    """Train state of one member (``seed`` may be traced): parameters from its "init" stream,
    AdamW's state, step 0, its "train" key, alive; with ``train.ema`` the moving average too."""
    keys = member_keys(seed)
    params = diffusion.init_params(net, cfg.model, spec, keys["init"])
    state = {"params": params, "opt": optimizer(cfg.train).init(params), "step": jnp.zeros((), jnp.int32),
             "key": keys["train"], "alive": jnp.ones((), bool)}
    if cfg.train.ema:
        state["ema"] = params  # moving average of the parameters (train.ema), used for evaluation
    return state


def eval_params(state: dict):
    """The parameters that are evaluated and saved: the moving average when train.ema is on."""
    return state.get("ema", state["params"])


def draw_batch(tc: C.TrainConfig, data: dict, key, step):
    """The training batch of ``step`` from a member's on-device training set, in the order of
    ``data.batches.batch_indices`` (``train.batches``: "epochs", each epoch reshuffled and read
    without replacement, its short last batch padded; or "replacement"), the order a host-fed
    member's feed follows too.

    Args:
      key: the member's train key; step: the global step (traced).
    Returns:
      (x [B, *x_shape], cond [B, cond_dim], n_valid: real rows (the first ones), or None = all B).
    """
    idx, n_valid = batch_indices(key, step, data["x_train"].shape[0], tc.batch_size, tc.batches)
    return data["x_train"][idx], data["c_train"][idx], n_valid


def call_rows(tc: C.TrainConfig, data: dict, key, step0, n: int):
    """The rows of ``draw_batch`` for the n steps step0 .. step0 + n - 1 of one compiled call, with
    each epoch's permutation computed once per call instead of once per step (a sort of the
    training set: about a quarter of a vector-MLP step). Same rows as ``draw_batch``.
    Returns (idx [n, B] int32, n_valid [n] int32)."""
    size, b = data["x_train"].shape[0], tc.batch_size
    per_epoch = -(-size // b)
    first = step0 // per_epoch
    epochs = first + jnp.arange((n - 1) // per_epoch + 2)  # every epoch a call of n steps can touch
    perms = jax.vmap(lambda e: epoch_permutation(key, e, size))(epochs)  # [E, size]
    return jax.vmap(lambda step: batch_indices(key, step, size, b, tc.batches, perm=perms[step // per_epoch - first]))(
        step0 + jnp.arange(n))


def train_step(cfg: C.Config, spec: D.DataSpec, apply_fn, state: dict, data: dict, batch: dict | None = None):
    """One AdamW step of one member, on ``batch`` when given (host-fed data), else on the batch
    ``draw_batch`` takes from its own training set.

    The step's key is ``fold_in(state["key"], state["step"])``: no key is carried forward. A step
    whose loss, gradient or hyperparameters are not finite is not applied and freezes the member
    for good.
    Returns (new_state, loss f32[]).
    """
    tc = cfg.train
    key = jax.random.fold_in(state["key"], state["step"])
    k_loss, k_view = jax.random.split(key)
    if batch is None:
        x, cond, n_valid = draw_batch(tc, data, state["key"], state["step"])
    else:
        x, cond, n_valid = batch["x"], batch["c"], batch["n"]
    x = D.train_view(spec, x, k_view)  # [B, *x_shape] float32

    def loss(params):
        return diffusion.loss_fn(apply_fn, cfg.model, params, x, cond, k_loss, train=True,
                                 p_cfg=tc.p_cfg, null_cond=D.null_cond(spec), n_valid=n_valid)

    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    # Finite loss, gradients and hyperparameters (learning rate, weight decay) give a finite AdamW
    # update of finite moments. Deciding from these, before the update, lets XLA fuse the
    # keep-or-replace select below into the update's own pass: deciding from the update's norm
    # needed a second pass over parameters and moments (about 20 % of a 64-member vector-MLP step on
    # the CPU). The gradients' norm is the one the clip computes anyway.
    hyper = jax.tree.leaves(state["opt"][1].hyperparams)  # optimizer(): chain(clip, adamw)
    ok = (state["alive"] & jnp.isfinite(value) & jnp.isfinite(optax.tree.norm(grads))
          & jnp.all(jnp.stack([jnp.isfinite(h).all() for h in hyper])))
    updates, opt = optimizer(tc).update(grads, state["opt"], state["params"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    params = optax.apply_updates(state["params"], updates)
    new = {"params": keep(params, state["params"]),
           "opt": keep(opt, state["opt"]), "step": state["step"] + 1, "key": state["key"], "alive": ok}
    if "ema" in state:
        new["ema"] = keep(optax.incremental_update(params, state["ema"], 1.0 - tc.ema), state["ema"])
    return new, value


def eval_loss(cfg: C.Config, spec: D.DataSpec, apply_fn, params, x, c, key, *, loop_safe: bool = True):
    """Loss of a held-back set, as the reference computes its validation and test losses.

    With ``eval.val_batches = 0``: the mean of the batch means over the whole set in batches of
    ``train.batch_size`` (the last one short); else that many random batches. The network is in
    eval mode; the conditioning is dropped with probability ``train.p_cfg`` and eps predicted with
    guidance ``eval.w_cfg``, as in the reference.

    Args:
      x: [N, *x_shape] as stored; c: [N, cond_dim]; key: draws of the loss (times, noise, batches).
      loop_safe: the batches are one ``lax.map``; False (a network slow inside XLA loops, see
        ``nets.loop_safe``) traces them as a Python loop. The choice is the caller's, made once.
    Returns:
      f32[]; NaN for an empty set.
    """
    n, b = x.shape[0], cfg.train.batch_size
    if n == 0:
        return jnp.float32(jnp.nan)
    kw = dict(train=False, p_cfg=cfg.train.p_cfg, null_cond=D.null_cond(spec), w_cfg=cfg.eval.w_cfg)
    x = D.train_view(spec, x, None)  # no augmentation: only the conversion to the network's input
    if cfg.eval.val_batches:
        def one(i):
            k = jax.random.fold_in(key, i)
            idx = jax.random.randint(jax.random.fold_in(k, 1), (b,), 0, n)
            return diffusion.loss_fn(apply_fn, cfg.model, params, x[idx], c[idx], k, **kw)[0]
        count = cfg.eval.val_batches
    else:
        count = -(-n // b)
        wrap = jnp.arange(count * b) % n  # the short last batch is padded with rows that do not count
        xp, cp = jnp.take(x, wrap, axis=0), jnp.take(c, wrap, axis=0)

        def one(i):
            xs = jax.lax.dynamic_slice_in_dim(xp, i * b, b)
            cs = jax.lax.dynamic_slice_in_dim(cp, i * b, b)
            return diffusion.loss_fn(apply_fn, cfg.model, params, xs, cs, jax.random.fold_in(key, i),
                                     n_valid=jnp.minimum(b, n - i * b), **kw)[0]
    if not loop_safe:
        return jnp.mean(jnp.stack([one(jnp.int32(i)) for i in range(count)]))
    return jnp.mean(jax.lax.map(one, jnp.arange(count)))
