"""One member's training: its train state, random streams, training batch, AdamW step and
held-back loss. Nothing here knows about a model axis; ``stack`` maps these over the members.

The parameters are one flat float32 vector (``Layout`` turns it into the network's pytree and
back), so the optimiser, the finite checks and the moving average are a few whole-vector
operations instead of one small kernel per parameter leaf:

    state = TrainState(params [P], mu [P], nu [P], ema [P] | None, step i32[], key u32[2],
                       alive bool[], hyper {name: f32[]})                     # one member
    data  = dict(x_train [N, ...], c_train [N, cond_dim], x_val, c_val, x_test, c_test, ...)
    batch = dict(x [B, ...], c [B, cond_dim], n [])  # a host-fed training batch (data.HOST_FED kinds)

The train step is ``train_step``, the loss it differentiates ``vdm.loss_fn``, the update
``adamw``. ``hyper`` holds every per-member setting a step or an evaluation reads
(``config.HYPER_FIELDS``: the optimiser's, the warmup, conditioning and network dropout, the
initial scale, the log-SNR range, the guidance weight), so that the members of one compiled
program may differ in any of them; ``Active`` says which optional parts the program holds.
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import config as C, data as D, vdm, nets
from jaxconcept.data.batches import batch_indices, epoch_permutation

# fields held per member in the state (``TrainState.hyper``, keyed by the field's name), so that
# members of one stack may differ in them
HYPER = tuple(f.split(".", 1)[1] for f in C.HYPER_FIELDS)
B1, B2, EPS = 0.9, 0.999, 1e-8  # AdamW's moment decays and epsilon (optax.adamw's defaults, the reference's)


@flax.struct.dataclass
class TrainState:
    """The train state of one member (of every member, stacked on a leading model axis, in ``stack``)."""

    params: jax.Array  # [P] float32, the network's and the schedule's parameters (``Layout``)
    mu: jax.Array  # [P] AdamW's first moment
    nu: jax.Array  # [P] AdamW's second moment
    ema: jax.Array | None  # [P] moving average of params (train.ema; evaluated and saved), or None
    step: jax.Array  # i32[] steps taken (= AdamW's update count while alive)
    key: jax.Array  # u32[2] the member's "train" key; step i draws from fold_in(key, i)
    alive: jax.Array  # bool[] False once a step was not finite: the member is frozen
    hyper: dict  # {HYPER name: f32[]} this member's hyperparameters


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Where each parameter leaf sits in the flat vector: leaves in ``jax.tree`` order, each
    raveled row-major. ``unravel`` splits (its transpose is one concatenation, so the gradient of
    the flat vector costs one copy, not one pass per leaf)."""

    treedef: object
    shapes: tuple  # leaf shapes

    @classmethod
    def of(cls, tree) -> Layout:
        """The layout of ``tree`` (arrays or ShapeDtypeStructs, all float32).
        Raises ValueError for a leaf of another dtype."""
        leaves, treedef = jax.tree.flatten(tree)
        if any(jnp.dtype(a.dtype) != jnp.float32 for a in leaves):
            raise ValueError("a flat parameter vector needs float32 leaves, got "
                             + ", ".join(sorted({str(a.dtype) for a in leaves})))
        return cls(treedef, tuple(tuple(a.shape) for a in leaves))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def ravel(self, tree):
        """pytree -> [P] (jax arrays)."""
        return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])

    def unravel(self, flat):
        """[..., P] -> the pytree, each leaf [..., *shape] (jax or numpy, any leading axes)."""
        sizes = [math.prod(s) for s in self.shapes]
        split = np.split if isinstance(flat, np.ndarray) else jnp.split
        parts = split(flat, np.cumsum(sizes)[:-1].tolist(), axis=-1)
        lead = flat.shape[:-1]
        return jax.tree.unflatten(self.treedef, [p.reshape(*lead, *s) for p, s in zip(parts, self.shapes)])


def member_keys(seed) -> dict:
    """Every random stream of a member derives from its seed: init, data, batches, samples, and
    elicitation's samples (``elicit``; a stream of its own, so its keys never meet the others').
    ``seed`` may be traced. Returns {name: key [2] uint32}."""
    root = jax.random.PRNGKey(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "data", "train", "sample", "elicit"))}


def hyper_values(members) -> dict:
    """The per-member settings (``HYPER``) of member configs: {name: float32 [M]}."""
    return {k: np.asarray([getattr(getattr(m, f.split(".")[0]), k) for m in members], np.float32)
            for k, f in zip(HYPER, C.HYPER_FIELDS)}


@dataclasses.dataclass(frozen=True)
class Active:
    """Which optional parts the programs of a stack hold, decided from every member: a part off
    for all of them is left out; one on for any is traced for all, and gives the numbers of "off"
    for a member whose value turns it off (decay 0, probability 0, rate 0, weight 1)."""

    ema: bool = False  # some train.ema > 0: the state holds a moving average
    p_cfg: bool = False  # some train.p_cfg > 0: conditioning dropout
    dropout: bool = False  # some model.dropout > 0: network dropout (a network that has it)
    guidance: bool = False  # some eval.w_cfg != 1: guided sampling and held-back losses

    @classmethod
    def of(cls, members) -> Active:
        return cls(ema=any(m.train.ema > 0 for m in members), p_cfg=any(m.train.p_cfg > 0 for m in members),
                   dropout=any(m.model.dropout > 0 for m in members),
                   guidance=any(m.eval.w_cfg != 1 for m in members))


def model_settings(model_cfg: C.ModelConfig, hyper: dict) -> vdm.ModelSettings:
    """The model settings of one member: its traced log-SNR range and initial scale (``hyper``),
    and the program's data noise."""
    return vdm.ModelSettings(gamma_min=hyper["gamma_min"], gamma_max=hyper["gamma_max"],
                                   data_noise=model_cfg.data_noise, init_scale=hyper["init_scale"])


def init_member(cfg: C.Config, spec: D.DataSpec, net, layout: Layout, seed, hyper: dict, *, ema: bool) -> TrainState:
    """Train state of one member (``seed`` and ``hyper`` may be traced): parameters from its
    "init" stream (``vdm.init_params`` at its initial scale and log-SNR range), zero moments,
    step 0, its "train" key, alive; with ``ema`` the moving average, starting at the parameters."""
    keys = member_keys(seed)
    hyper = {k: jnp.float32(hyper[k]) for k in HYPER}
    params = layout.ravel(vdm.init_params(net, model_settings(cfg.model, hyper), spec, keys["init"]))
    zeros = jnp.zeros_like(params)
    return TrainState(params=params, mu=zeros, nu=zeros, ema=params if ema else None, step=jnp.zeros((), jnp.int32),
                      key=keys["train"], alive=jnp.ones((), bool), hyper=hyper)


def eval_params(state: TrainState):
    """The flat parameters that are evaluated and saved: the moving average when there is one."""
    return state.params if state.ema is None else state.ema


def adamw(state: TrainState, grads, loss) -> TrainState:
    """One AdamW step on the flat parameters, after clipping the gradient's global norm to
    ``hyper["grad_clip"]`` (the reference: torch's clip_grad_norm_ and AdamW; the same arithmetic
    as optax.chain(clip_by_global_norm, adamw) with its defaults b1 0.9, b2 0.999, eps 1e-8), at
    the learning rate lr * min(1, count / warmup) of update ``count`` (1, 2, ...): a linear warmup
    over ``hyper["warmup"]`` steps (optax.linear_schedule from lr / warmup); warmup 0 gives
    count / 0 = inf, so the factor is exactly 1.

    A step whose loss, gradient or hyperparameters are not finite is not applied and freezes the
    member for good (``alive`` False). Deciding before the update lets XLA fuse the keep-or-replace
    selects into the update's one pass over the vectors.
    Args:
      grads: [P] the loss's gradient; loss: f32[].
    """
    h = state.hyper
    g_norm = jnp.sqrt(jnp.sum(jnp.square(grads)))
    ok = state.alive & jnp.isfinite(loss) & jnp.isfinite(g_norm)
    for v in h.values():
        ok &= jnp.isfinite(v)
    grads = jnp.where(g_norm < h["grad_clip"], grads, grads / g_norm * h["grad_clip"])
    count = state.step + 1
    mu = (1 - B1) * grads + B1 * state.mu
    nu = (1 - B2) * grads ** 2 + B2 * state.nu
    update = (mu / (1 - B1 ** count)) / (jnp.sqrt(nu / (1 - B2 ** count)) + EPS) + h["weight_decay"] * state.params
    lr = h["lr"] * jnp.minimum(1.0, count.astype(jnp.float32) / h["warmup"])
    params = state.params + update * -lr
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    ema = None
    if state.ema is not None:  # ema <- d ema + (1 - d) params (d = 0: the parameters themselves)
        ema = keep((1 - h["ema"]) * params + h["ema"] * state.ema, state.ema)
    return state.replace(params=keep(params, state.params), mu=keep(mu, state.mu), nu=keep(nu, state.nu), ema=ema,
                         step=state.step + 1, alive=ok)


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


def train_step(cfg: C.Config, spec: D.DataSpec, net, layout: Layout, state: TrainState, data: dict,
               batch: dict | None = None, *, active: Active = Active()):
    """One AdamW step of one member, on ``batch`` when given (host-fed data), else on the batch
    ``draw_batch`` takes from its own training set; the member's settings from ``state.hyper``
    (``active``: which optional parts the program holds).

    The step's key is ``fold_in(state.key, state.step)``: no key is carried forward.
    Returns (new_state, loss f32[]).
    """
    tc, h = cfg.train, state.hyper
    apply_fn = vdm.make_apply(nets.with_dropout(net, h["dropout"]) if active.dropout else net)
    k_loss, k_view = jax.random.split(jax.random.fold_in(state.key, state.step))
    if batch is None:
        x, cond, n_valid = draw_batch(tc, data, state.key, state.step)
    else:
        x, cond, n_valid = batch["x"], batch["c"], batch["n"]
    x = D.train_view(spec, x, k_view)  # [B, *x_shape] float32

    def loss(flat):
        return vdm.loss_fn(apply_fn, model_settings(cfg.model, h), layout.unravel(flat), x, cond, k_loss,
                                 train=True, p_cfg=h["p_cfg"] if active.p_cfg else 0.0, null_cond=D.null_cond(spec),
                                 n_valid=n_valid)

    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    return adamw(state, grads, value), value


def held_back_losses(cfg: C.Config, spec: D.DataSpec, apply_fn, params, sets, keys, *, loop_safe: bool = True,
                     model=None, p_cfg=None, w_cfg=None):
    """Losses of held-back sets (validation, test), as the reference computes its validation and
    test losses, with one copy of the network for all of them: every set's batches are stacked
    and mapped over together.

    With ``eval.val_batches = 0``: per set, the mean of the batch means over the whole set in
    batches of ``train.batch_size`` (the last one short); else that many random batches per set.
    The network is in eval mode; the conditioning is dropped with probability ``train.p_cfg``
    and eps predicted with guidance ``eval.w_cfg``, as in the reference.

    Args:
      params: the network's parameter pytree.
      sets: [(x [N, *x_shape] as stored, c [N, cond_dim]), ...].
      keys: one key per set: the draws of its loss (times, noise, batches); batch i of a set
        draws from fold_in(its key, i).
      loop_safe: the batches are one ``lax.map``; False (a network slow inside XLA loops, see
        ``nets.loop_safe``) traces them as a Python loop. The choice is the caller's, made once.
      model, p_cfg, w_cfg: the member's model settings (``model_settings``), conditioning dropout
        and guidance weight, possibly traced (default: ``cfg``'s).
    Returns:
      [f32[] per set]; NaN for an empty set.
    """
    b = cfg.train.batch_size
    model = cfg.model if model is None else model
    kw = dict(train=False, p_cfg=cfg.train.p_cfg if p_cfg is None else p_cfg, null_cond=D.null_cond(spec),
              w_cfg=cfg.eval.w_cfg if w_cfg is None else w_cfg)
    xs, cs, ks, nv, owner = [], [], [], [], []
    for j, ((x, c), key) in enumerate(zip(sets, keys)):
        n = x.shape[0]
        if n == 0:
            continue
        x = D.train_view(spec, x, None)  # no augmentation: only the conversion to the network's input
        count = cfg.eval.val_batches or -(-n // b)
        bk = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))  # [count, 2]
        if cfg.eval.val_batches:  # random batches
            idx = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (b,), 0, n))(bk)
            valid = jnp.full((count,), b)
        else:  # the whole set; the short last batch is padded with rows that do not count
            idx = (jnp.arange(count * b) % n).reshape(count, b)
            valid = jnp.minimum(b, n - jnp.arange(count) * b)
        xs.append(jnp.take(x, idx, axis=0))
        cs.append(jnp.take(c, idx, axis=0))
        ks.append(bk)
        nv.append(valid)
        owner += [j] * count
    out = [jnp.float32(jnp.nan)] * len(sets)
    if not owner:
        return out
    batches = (jnp.concatenate(xs), jnp.concatenate(cs), jnp.concatenate(ks), jnp.concatenate(nv))

    def one(xb, cb, kb, nb):  # the loss of one batch; a full batch passes n_valid = B, the same loss as None
        return vdm.loss_fn(apply_fn, model, params, xb, cb, kb, n_valid=nb, **kw)[0]
    if loop_safe:
        per_batch = jax.lax.map(lambda a: one(*a), batches)
    else:
        per_batch = jnp.stack([one(*(a[i] for a in batches)) for i in range(len(owner))])
    owner = np.asarray(owner)
    for j in set(owner.tolist()):
        out[j] = jnp.mean(per_batch[np.flatnonzero(owner == j)])
    return out


def eval_loss(cfg: C.Config, spec: D.DataSpec, apply_fn, params, x, c, key, *, loop_safe: bool = True):
    """The loss of one held-back set (``held_back_losses`` of that set alone): f32[]."""
    return held_back_losses(cfg, spec, apply_fn, params, [(x, c)], [key], loop_safe=loop_safe)[0]
