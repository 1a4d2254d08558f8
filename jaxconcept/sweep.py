"""The sweep engine: many models trained at once as one stacked train state.

A sweep of M members is one pytree whose leaves carry a leading model axis. One jitted call
(`advance`) moves every member up to K steps: a `lax.scan` over steps whose body maps the single-
member `train_step` over the model axis (`vmap`; or `lax.map` in chunks of vmapped members, or
one traced copy per member: `train.strategy`, chosen by memory when "auto"). The model axis is
split over the devices (and hosts) with `shard_map` on a 1-D mesh named "models"; a member count
that does not divide the device count is padded with inert copies of the last member (trained,
never written). A U-Net with XLA's own convolutions on CPU (model.conv="xla") takes one step per
call without scan (XLA:CPU's slow path for convolution gradients in loops). A single run is a
sweep of one. This is the only module that knows about the model axis.

    state = {"params", "opt", "step", "key", "alive"[, "ema"]}  # each leaf: [M, ...]
    data  = dict(x_train, c_train, y_train, x_val, c_val, y_val, x_test, c_test, y_test)  # [M, N, ...]
    batch = dict(x [B, ...], c [B, cond_dim], n [])  # a host-fed training batch (data.HOST_FED kinds)
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxconcept import checkpoint, data as D, diffusion, nets, rundir
from jaxconcept import config as C
from jaxconcept.data.batches import batch_indices

AXIS = "models"
HEADROOM = 0.85  # "auto" plans for this share of the memory budget


class RunError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# One member
# --------------------------------------------------------------------------------------------
def optimizer(tc: C.TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (SPEC A2). The learning rate lives in the optimiser state
    (inject_hyperparams), so members may differ in it."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.inject_hyperparams(optax.adamw)(learning_rate=tc.lr, weight_decay=tc.weight_decay),
    )


def member_keys(seed: int) -> dict:
    """Every random stream of a member derives from its seed: init, data, batches, samples, and
    elicitation's samples (``elicit``; a stream of its own, so its keys never meet the others')."""
    root = jax.random.PRNGKey(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "data", "train", "sample", "elicit"))}


def train_keys(members) -> np.ndarray:
    """The train keys of member configs: [M, 2] uint32 (what a host feed orders batches by)."""
    return np.stack([np.asarray(member_keys(int(m.seeds[0]))["train"]) for m in members])


def init_member(cfg: C.Config, spec: D.DataSpec, net, seed) -> dict:
    """Train state of one member (seed may be traced)."""
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


def train_step(cfg: C.Config, spec: D.DataSpec, apply_fn, state: dict, data: dict, batch: dict | None = None):
    """One AdamW step of one member, on ``batch`` when given (host-fed data), else on the batch
    ``draw_batch`` takes from its own training set.

    A step whose loss, gradient or hyperparameters are not finite is not applied and freezes the
    member for good.
    Returns (new_state, loss).
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


def eval_loss(cfg: C.Config, spec: D.DataSpec, apply_fn, params, x, c, key):
    """Loss of a held-back set, as the reference computes its validation and test losses.

    With ``eval.val_batches = 0``: the mean of the batch means over the whole set in batches of
    ``train.batch_size`` (the last one short); else that many random batches. The network is in
    eval mode; the conditioning is dropped with probability ``train.p_cfg`` and eps predicted with
    guidance ``eval.w_cfg``, as in the reference. NaN for an empty set.
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
    if diffusion.python_loop(cfg.model):
        return jnp.mean(jnp.stack([one(jnp.int32(i)) for i in range(count)]))
    return jnp.mean(jax.lax.map(one, jnp.arange(count)))


# --------------------------------------------------------------------------------------------
# The stacked sweep
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Sweep:
    """Everything static about a sweep; the arrays (state, data) are passed around separately.

    ``members`` are the real members; ``padded`` adds inert copies of the last one so that the
    model axis divides the mesh. Arrays carry the padded axis; what is written is sliced to the
    real members (``real``).
    """

    cfg: C.Config
    members: tuple  # one scalar C.Config per real member
    padded: tuple  # members + inert copies of the last one
    spec: D.DataSpec
    net: object
    mesh: Mesh
    strategy: str  # as configured; "auto" is resolved by ``resolved``
    chunk: int  # members per lax.map chunk (strategy "map")

    @functools.cached_property
    def resolved(self) -> "Sweep":
        """This sweep with a concrete stacking strategy ("auto" planned by memory, ``plan``)."""
        if self.strategy != "auto":
            return self
        chosen, why = plan(self)
        if jax.process_index() == 0:
            print(f"jaxconcept: stacking strategy {chosen.strategy}"
                  + (f" (chunks of {chosen.chunk})" if chosen.strategy == "map" else "") + f": {why}", flush=True)
        return chosen

    @functools.cached_property
    def fns(self):
        """The jitted (init, advance, evaluate) of this sweep, compiled once per Sweep object
        (for "auto", those of the planned sweep, whose advance the plan already compiled)."""
        return self.resolved.fns if self.strategy == "auto" else _compile(self)

    @functools.cached_property
    def host_eval(self) -> dict | None:
        """Host-fed kinds: the held-back sets of every (padded) member, numpy [M, N, ...], read once."""
        return D.host_eval_data(self.spec, self.padded) if self.host_fed else None

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def apply_fn(self):
        return diffusion.make_apply(self.net)

    @property
    def host_fed(self) -> bool:
        return self.spec.kind in D.HOST_FED

    def real(self, x):
        """The real members' rows of a padded stacked array (numpy)."""
        return x[: self.size]

    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    def _map(self, fn, *stacked):
        """Map a one-member function over the (local) model axis with the resolved strategy."""
        if self.strategy == "map":
            return jax.lax.map(lambda a: fn(*a), stacked, batch_size=self.chunk)
        if self.strategy == "unroll":  # one copy of fn per member: no grouped convs, no loop
            n = jax.tree.leaves(stacked)[0].shape[0]
            outs = [fn(*jax.tree.map(lambda a: a[i], stacked)) for i in range(n)]
            return jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return jax.vmap(fn)(*stacked)

    def _sharded(self, fn, n_in: int):
        """shard_map(fn) over the model axis: each device runs ``fn`` on its members.

        Inputs/outputs are pytrees whose leaves lead with the model axis; extra trailing
        arguments (beyond n_in) are replicated.
        """
        if self.mesh.size == 1 and jax.process_count() == 1:
            return fn  # one device: plain jit (XLA:CPU runs convolutions nested in shard_map ~15x slower)
        spec = P(AXIS)

        def wrapped(*args):
            in_specs = tuple([spec] * n_in + [P()] * (len(args) - n_in))
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
        return wrapped


def make_mesh(n_members: int, devices=None) -> Mesh:
    """A 1-D 'models' mesh over every device, or over one device per member when there are
    fewer members than devices (the member count is then padded to a multiple of it). With
    several processes every device stays in the mesh, so that every process holds members (the
    few are padded with inert copies)."""
    devices = list(devices if devices is not None else jax.devices())
    if jax.process_count() > 1:
        return Mesh(np.array(devices), (AXIS,))
    return Mesh(np.array(devices[: max(1, min(len(devices), n_members))]), (AXIS,))


def build(cfg: C.Config, devices=None) -> Sweep:
    """The static sweep of ``cfg``: member configs (padded to the mesh), data spec, network, mesh."""
    ms = tuple(C.members(cfg))
    mesh = make_mesh(len(ms), devices)
    n_pad = -len(ms) % mesh.size
    spec = D.spec(ms[0].data)
    return Sweep(cfg=cfg, members=ms, padded=ms + (ms[-1],) * n_pad, spec=spec, net=nets.build(cfg.model, spec),
                 mesh=mesh, strategy=cfg.train.strategy, chunk=cfg.train.map_batch_size)


def stacked_data_params(sw: Sweep, members=None):
    """Per-member data-generating parameters, stacked on a leading model axis."""
    ps = [D.params(m.data) for m in (members or sw.padded)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ps)


def seeds_array(sw: Sweep, members=None):
    return jnp.asarray([m.seeds[0] for m in (members or sw.padded)], jnp.int32)


def steps_per_call(cfg: C.Config) -> int:
    """K: train.steps_per_call, or 1 for networks that must not step inside a scan (a U-Net with
    model.conv="xla" on CPU, ``diffusion.python_loop``; its steps are long enough that one call per
    step costs nothing)."""
    return 1 if diffusion.python_loop(cfg.model) else cfg.train.steps_per_call


def _local_fns(sw: Sweep):
    """The per-device (unsharded, unjitted) init, advance and evaluate of a sweep."""
    cfg, spec, apply_fn = sw.cfg, sw.spec, sw.apply_fn

    def init_local(seeds, dparams):
        def one(seed, dp):
            data = {} if sw.host_fed else D.dataset(spec, dp, member_keys(seed)["data"])
            return init_member(cfg, spec, sw.net, seed), data
        if sw.strategy == "unroll":  # initialisers and rendering are elementwise: vmap gives the same bits
            return jax.vmap(one)(seeds, dparams)  # and compiles once, not once per member (8 U-Nets: 400 s)
        return sw._map(one, seeds, dparams)

    def advance_local(state, data, batches, n: int):
        # n (static) steps: one plain step, or a lax.scan of n with no conditional in its body (on
        # XLA:GPU a lax.cond copies its predicate to the host every step); ``advance`` compiles this
        # for K = steps_per_call and for 1 and runs a remainder as single steps. Networks slow
        # inside loops (diffusion.python_loop) have K = 1.
        # batches: None, or host-fed {x, c, n} with leaves [M, n, ...].
        def run(s, b):
            step = functools.partial(train_step, cfg, spec, apply_fn)
            if b is None:
                return sw._map(step, s, data)
            return sw._map(step, s, data, b)

        if n == 1:
            return run(state, None if batches is None else jax.tree.map(lambda a: a[:, 0], batches))

        def body(st, i):  # the barriers keep XLA from fusing across steps: a scanned step is
            # bit for bit the one-step program (without them a scalar's AdamW moment moved an ulp)
            b = None if batches is None else jax.tree.map(lambda a: a[:, i], batches)
            return jax.lax.optimization_barrier(run(jax.lax.optimization_barrier(st), b))
        state, losses = jax.lax.scan(body, state, jnp.arange(n), unroll=cfg.train.scan_unroll or 1)
        return state, jnp.sum(losses, 0) / n  # losses [n, m]

    def evaluate_local(state, data, prompts, seeds, step):
        # prompts [m, n_classes, n_samples, cond_dim] -> samples [m, n_classes, n_samples, *x_shape]
        ec = cfg.eval
        def one(st, dat, pr, seed):
            key = jax.random.fold_in(member_keys(seed)["sample"], step)
            params = eval_params(st)
            x = diffusion.sample(apply_fn, cfg.model, params, pr.reshape(-1, pr.shape[-1]), key, x_shape=spec.x_shape,
                                 n_steps=ec.sampler_steps, w_cfg=ec.w_cfg, null_cond=D.null_cond(spec),
                                 output=ec.sampler_output)
            vl = eval_loss(cfg, spec, apply_fn, params, dat["x_val"], dat["c_val"], jax.random.fold_in(key, 1))
            tl = eval_loss(cfg, spec, apply_fn, params, dat["x_test"], dat["c_test"], jax.random.fold_in(key, 2))
            return x.reshape(*pr.shape[:2], *spec.x_shape), vl, tl
        return sw._map(one, state, data, prompts, seeds)

    return init_local, advance_local, evaluate_local


def _compile(sw: Sweep):
    """The jitted functions of a sweep (cached per static sweep)."""
    init_local, advance_local, evaluate_local = _local_fns(sw)
    sh = sw.sharding()
    init = jax.jit(sw._sharded(init_local, 2), out_shardings=sh)
    advance = functools.cache(lambda n: jax.jit(sw._sharded(functools.partial(advance_local, n=n), 3),
                                                 donate_argnums=0))  # n -> the program of n steps
    evaluate = jax.jit(sw._sharded(evaluate_local, 4))
    return init, advance, evaluate


# --------------------------------------------------------------------------------------------
# Choosing the stacking strategy by memory
# --------------------------------------------------------------------------------------------
def host_available_memory(root: str = "/") -> tuple[float, str]:
    """Bytes the host can still give this process, and where the figure comes from: the kernel's
    MemAvailable (free pages plus reclaimable page cache; MemFree alone counts the cache as used),
    lowered to what a cgroup limit leaves (its limit less its working set: usage less inactive
    file pages), as container runtimes count it. ``root`` prefixes /proc and /sys (tests)."""
    base = Path(root)
    found = []
    try:
        info = dict(line.split(":", 1) for line in (base / "proc/meminfo").read_text().splitlines() if ":" in line)
        found.append((float(info["MemAvailable"].split()[0]) * 1024, "MemAvailable"))
    except (OSError, KeyError, ValueError):
        pass
    for limit_f, usage_f, stat_f in (("memory.max", "memory.current", "memory.stat"),  # cgroup v2, then v1
                                     ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                      "memory/memory.stat")):
        cg = base / "sys/fs/cgroup"
        try:
            limit = (cg / limit_f).read_text().strip()
            if limit == "max" or float(limit) >= 2 ** 60:  # no limit
                continue
            stat = dict(line.split() for line in (cg / stat_f).read_text().splitlines() if len(line.split()) == 2)
            used = float((cg / usage_f).read_text()) - float(stat.get("inactive_file", stat.get("total_inactive_file", 0)))
            found.append((max(0.0, float(limit) - used), "the cgroup's memory limit less its working set"))
            break
        except (OSError, ValueError):
            continue
    if not found:
        return float(16 << 30), "unknown (no /proc/meminfo): assumed 16 GiB"
    return min(found)


def memory_budget(cfg: C.Config, device=None) -> tuple[float, str]:
    """Bytes one device may use, and where the figure comes from: ``train.memory_budget`` when
    set, else the device's free memory (its allocator's limit less what is in use), else (CPU)
    the host's available memory (``host_available_memory``) shared among the local devices."""
    if cfg.train.memory_budget:
        return float(cfg.train.memory_budget), "train.memory_budget"
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"free memory of {device.device_kind}"
    avail, source = host_available_memory()
    n = jax.local_device_count()
    return avail / max(1, n), f"host memory available: {source}" + (f", shared by {n} devices" if n > 1 else "")


def _abstract_inputs(sw: Sweep):
    """ShapeDtypeStructs (with their shardings) of the K-step program's arguments, as
    ``init`` and ``advance`` make them: lowering the sweep's own jitted advance with these
    compiles the very program the first real call runs (the compile is then reused)."""
    m, sh = len(sw.padded), sw.sharding()
    one = lambda seed, dp: (init_member(sw.cfg, sw.spec, sw.net, seed),  # noqa: E731 - shapes only
                            {} if sw.host_fed else D.dataset(sw.spec, dp, member_keys(seed)["data"]))
    state, data = jax.eval_shape(jax.vmap(one), jax.ShapeDtypeStruct((m,), jnp.int32),
                                 jax.eval_shape(lambda: stacked_data_params(sw)))
    if sw.host_fed:
        data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in sw.host_eval.items()}
    put = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)  # noqa: E731
    return jax.tree.map(put, state), jax.tree.map(put, data), jax.tree.map(put, _abstract_batches(sw, m))


def _memory(sw: Sweep) -> tuple[float, float]:
    """(peak bytes, bytes that do not shrink with chunking: arguments + outputs - donated) one
    device needs for ``advance`` of a sweep with a concrete strategy, from XLA's memory analysis of
    its compiled program (compiled from shapes alone; the sweep's later calls reuse it)."""
    m = sw.fns[1](steps_per_call(sw.cfg)).lower(*_abstract_inputs(sw)).compile().memory_analysis()
    if m is None:
        return float("nan"), float("nan")
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - getattr(m, "alias_size_in_bytes", 0)
    return float(fixed + m.temp_size_in_bytes), float(fixed)


def step_memory(sw: Sweep) -> float:
    """Peak bytes one device needs for ``advance`` (XLA's compiled memory analysis: arguments,
    outputs and temporaries, less donated buffers), from shapes alone."""
    return _memory(sw.resolved)[0]


def plan(sw: Sweep) -> tuple[Sweep, str]:
    """Resolve ``train.strategy="auto"``: the fastest stacking whose step fits in memory.

    Preference: "vmap" (on CPU, "unroll" for conv nets: XLA:CPU's grouped convolutions are slow),
    then "map" in chunks of half as many members, and so on down to one member at a time; a chunk
    is compiled only when a prediction from the plans measured so far (the memory chunking cannot
    shrink, plus temporaries in proportion to the chunk) says it is smaller than every refused
    plan and may fit. Each plan tried is compiled from shapes, and the chosen one's program is the
    one training runs (compiled once).
    Returns (the sweep with its strategy resolved, the reason).
    Raises RunError naming each plan measured, the budget and its source, and what to change.
    """
    per_dev = len(sw.padded) // sw.mesh.size
    first = dataclasses.replace(sw, strategy="unroll" if jax.default_backend() == "cpu" and sw.cfg.model.arch == "unet"
                                else "vmap", chunk=1)  # XLA:CPU runs vmapped (grouped) convolutions slowly
    if per_dev == 1:
        return first, "one member per device: nothing to chunk"
    budget, source = memory_budget(sw.cfg)
    limit = HEADROOM * budget
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    need, fixed = _memory(first)
    tried = [f"{first.strategy} of {per_dev} members {mib(need)}"]
    if not need > limit:  # NaN (no analysis) counts as fitting
        return first, (f"{per_dev} member(s) per device need {mib(need)} of {mib(budget)} ({source}, "
                       f"{HEADROOM:.0%} planned)")
    smallest, temp, c = need, need - fixed, per_dev
    while c > 1:
        c = -(-c // 2)
        if fixed + temp * c / per_dev >= min(smallest, limit):
            continue  # predicted no smaller than a refused plan, or over the budget: not compiled
        cand = dataclasses.replace(sw, strategy="map", chunk=c)
        got, _ = _memory(cand)
        tried.append(f"map in chunks of {c} {mib(got)}")
        if not got > limit:
            return cand, (f"{per_dev} member(s) per device in chunks of {c} need {mib(got)} of {mib(budget)} "
                          f"({source}, {HEADROOM:.0%} planned); tried " + ", ".join(tried))
        smallest = min(smallest, got)
    raise RunError(f"the training step of {per_dev} member(s) per device needs more than the {mib(limit)} planned "
                   f"({HEADROOM:.0%} of {mib(budget)}, {source}): " + "; ".join(tried)
                   + f" (at least {mib(fixed)} hold the stacked state and batches whatever the chunking); if more "
                   "memory is free, say how much with train.memory_budget (bytes); else train fewer members per run "
                   "(seeds, sweep lists), a smaller model or train.batch_size, or use more devices")


def _abstract_batches(sw: Sweep, m: int):
    """ShapeDtypeStructs of one call's host-fed batches for m members (None when not host-fed)."""
    if not sw.host_fed:
        return None
    k, b = steps_per_call(sw.cfg), sw.cfg.train.batch_size
    x_dtype = D.host_dtype(sw.spec)
    return {"x": jax.ShapeDtypeStruct((m, k, b, *sw.spec.x_shape), x_dtype),
            "c": jax.ShapeDtypeStruct((m, k, b, sw.spec.cond_dim), jnp.float32),
            "n": jax.ShapeDtypeStruct((m, k), jnp.int32)}


# --------------------------------------------------------------------------------------------
# Public API of the stacked state
# --------------------------------------------------------------------------------------------
def init(sw: Sweep, members=None):
    """Stacked train state and per-member datasets, rendered on device, sharded over the mesh.

    ``members`` (default: the sweep's own, padded) may name other member configs of the same
    count and shapes, reusing the compiled function (e.g. to initialise one member at a time).
    """
    init_fn, _, _ = sw.fns
    seeds = _put(sw, seeds_array(sw, members))
    dparams = jax.tree.map(lambda a: _put(sw, a), stacked_data_params(sw, members))
    state, data = init_fn(seeds, dparams)
    if sw.host_fed:  # held-back sets from the host; the training set streams (``data.host_feed``)
        held = sw.host_eval if members is None else D.host_eval_data(sw.spec, members)
        data = {k: _put(sw, v) for k, v in held.items()}
    return state, data


def advance(sw: Sweep, state, data, n: int, batches=None):
    """Advance every member ``n`` <= ``steps_per_call(cfg)`` steps. Returns (state, mean loss [M]).

    n = K runs the compiled K-step program; a remainder n < K runs n calls of a one-step program
    (two programs in all, whatever the distances to evaluation points; the same numbers as any
    other split of the steps).
    ``batches``: for host-fed data, numpy {x [M, K, B, ...], c [M, K, B, cond_dim], n [M, K]}."""
    _, program, _ = sw.fns
    k = steps_per_call(sw.cfg)
    assert 0 < n <= k

    def put(i, j):  # the host-fed batches of steps i..j-1 of this call
        return None if batches is None else jax.tree.map(lambda a: _put(sw, np.asarray(a)[:, i:j]), batches)
    if n == k:
        return program(k)(state, data, put(0, k))
    total = 0.0
    for i in range(n):
        state, loss = program(1)(state, data, put(i, i + 1))
        total = total + loss
    return state, total / n


@functools.lru_cache(maxsize=8)
def _prompts_host(sw: Sweep) -> np.ndarray:
    """Evaluation prompts of every (padded) member, drawn once per member: [M, n_classes, n, cond_dim]."""
    ec = sw.cfg.eval
    out = [D.eval_prompts(sw.spec, D.params(m.data), jax.random.fold_in(member_keys(m.seeds[0])["data"], 1),
                          ec.n_samples, ec.prompts) for m in sw.padded]
    return np.stack([np.asarray(p) for p in out])


def evaluate(sw: Sweep, state, data, step: int):
    """Samples of every class and the validation and held-out losses, for every (padded) member.

    Returns (samples [M, n_classes, n_samples, *x_shape], prompts [M, n_classes, n_samples,
    cond_dim], val [M], test [M]) as global arrays (``host`` gathers them).
    """
    _, _, ev = sw.fns
    prompts = _put(sw, _prompts_host(sw))
    seeds = _put(sw, np.asarray(seeds_array(sw)))
    samples, val, test = ev(state, data, prompts, seeds, jnp.asarray(step, jnp.int32))
    return samples, prompts, val, test


def _put(sw: Sweep, a):
    """A host array with a leading (padded) model axis as a global array sharded over the mesh;
    every process passes the same full array and places its own devices' rows."""
    a = np.asarray(a)
    sh = sw.sharding()
    if jax.process_count() == 1:
        return jax.device_put(a, sh)
    return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])


def host(x):
    """A (possibly multi-host) global array as a numpy array on every host. Every process must
    call it (it is a collective when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# A run on disk: train with evaluation, checkpoints and resume
# --------------------------------------------------------------------------------------------
def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _config_diffs(old: dict, cfg: C.Config) -> list[str]:
    try:  # fields added since ``old`` was written take their defaults
        old = C.to_dict(C.from_dict(old))
    except (C.ConfigError, TypeError, AttributeError):
        pass
    old, new = _flat(old), _flat(C.to_dict(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _prepare_run_dir(cfg: C.Config, run_dir: Path) -> None:
    """Check ``run_dir`` can hold this run (nothing written yet): a directory or nothing, under a
    writable directory, holding no other run."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunError(f"--out {run_dir}: {parent} is a file, not a directory")
        if parent.exists():
            break
    for name, what in (("config.json", "the run's config"), ("checkpoints/config.json", "a copy of the config")):
        p = run_dir / name
        if p.exists():
            try:
                old = rundir.read_json(p, what)
            except rundir.RunDirError as exc:
                raise RunError(str(exc)) from None
            diffs = _config_diffs(old, cfg) if isinstance(old, dict) else ["(not a config)"]
            if diffs:
                raise RunError(f"{run_dir} holds a run with a different config ({'; '.join(diffs)}); "
                               "use another --out, or the same config to resume")
    trained = any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")) or any(
        rundir.steps_with(run_dir, sub) for sub in ("samples", "params")) or bool(rundir.load_metrics(run_dir))
    if trained and not (run_dir / "config.json").exists():
        if not (run_dir / "checkpoints" / "config.json").exists():
            raise RunError(f"{run_dir} holds training files but no config.json, so the config they were "
                           "trained with is unknown; restore config.json, or use another --out")


def _write_run_files(sw: Sweep, run_dir: Path) -> None:
    """config.json (once; both copies), members.json (when missing or unreadable). Process 0."""
    for p in (run_dir / "config.json", run_dir / "checkpoints" / "config.json"):
        if not p.exists():
            rundir.write_json(p, C.to_dict(sw.cfg), indent=2)
    try:
        ok = len(rundir.load_members(run_dir)) == sw.size
    except rundir.RunDirError:
        ok = False
    if not ok:
        rundir.write_json(run_dir / "members.json", _members_json(sw))


def _members_json(sw: Sweep) -> list[dict]:
    out = []
    for i, m in enumerate(sw.members):
        sig = D.concept_signal(m.data)
        out.append({"index": i, **C.sweep_settings(m),
                    "signal": {k: float(v) for k, v in sig.items()}})
    return out


def train(cfg: C.Config, run_dir, *, progress: bool = True, devices=None, stop_after: int | None = None):
    """Train the sweep ``cfg`` into ``run_dir`` with evaluation, checkpoints and resume.

    Running the same command again continues from the newest readable checkpoint and ends with
    the same parameters and samples as an uninterrupted run. Only process 0 writes files; every
    process runs this function (multi-host sweeps).

    Args:
      cfg: the (sweep) config.
      run_dir: output directory (created; must hold the same config if it exists).
      progress: show a tqdm progress bar.
      devices: devices for the model axis (default: all).
      stop_after: stop (after checkpointing) once this step is reached; for tests and budgets.
    Returns:
      (sweep, final stacked state) — the state holds the padded members.
    Raises:
      RunError: the directory holds another run, is locked by another process, or cannot be written.
    """
    run_dir = Path(run_dir)
    if jax.process_count() > 1:
        check_processes_agree(cfg)
    _prepare_run_dir(cfg, run_dir)
    lead = jax.process_index() == 0
    try:
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
        with rundir.lock(run_dir) if lead else _nothing():
            return _train(cfg, run_dir, progress=progress and lead, devices=devices, stop_after=stop_after)
    except rundir.RunDirError as exc:
        raise RunError(str(exc)) from None
    except OSError as exc:
        raise RunError(f"cannot write the run directory {run_dir}: {exc.strerror or exc} "
                       f"({exc.filename or run_dir})") from None


def check_processes_agree(cfg: C.Config) -> None:
    """Every process of a multi-process run compares its resolved config and the versions of
    jaxconcept and jax with every other's (a collective: all processes call it), and all refuse
    together, naming the fields that differ, before anything is written.

    Raises RunError naming, per differing process, each field with process 0's value and its own.
    """
    import json

    from jax.experimental import multihost_utils

    import jaxconcept

    mine = {"config": C.to_dict(cfg), "jaxconcept": jaxconcept.__version__, "jax": jax.__version__}
    blob = np.frombuffer(json.dumps(mine, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    runs = [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes)]
    problems = []
    for i, other in enumerate(runs[1:], 1):
        diffs = [f"{k} {runs[0][k]} vs {other[k]}" for k in ("jaxconcept", "jax") if other[k] != runs[0][k]]
        flat0, flat = _flat(runs[0]["config"]), _flat(other["config"])
        diffs += [f"{k} {flat0.get(k)!r} vs {flat.get(k)!r}" for k in sorted(set(flat0) | set(flat))
                  if flat0.get(k) != flat.get(k)]
        if diffs:
            problems.append(f"process {i}: " + ", ".join(diffs))
    if problems:
        raise RunError(f"the {len(runs)} processes of this run disagree (process 0's value vs theirs): "
                       + "; ".join(problems) + "; start every process with the same config and versions")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _train(cfg, run_dir, *, progress, devices, stop_after):
    from tqdm.auto import tqdm

    lead = jax.process_index() == 0
    sw = build(cfg, devices)
    if lead:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        _write_run_files(sw, run_dir)
    state, data = init(sw)
    mngr, start, restored = restore(sw, run_dir / "checkpoints", state)
    if restored is not None:
        state = restored
    start = start or 0
    if lead:
        rundir.reconcile_metrics(run_dir, start)
    feed = D.host_feed(sw.spec, sw.padded, train_keys(sw.padded)) if sw.host_fed else None

    tc, total = cfg.train, cfg.train.steps
    evals = [s for s in C.eval_steps(cfg) if s > start or (s == 0 and start == 0)]
    if evals and evals[0] == 0:
        _evaluate_and_save(sw, state, data, 0, run_dir, cfg)
        evals = evals[1:]
    stops = sorted(set(evals) | set(range(tc.checkpoint_every, total + 1, tc.checkpoint_every)) | {total})
    stops = [s for s in stops if s > start]
    if stop_after is not None:
        stops = sorted({s for s in stops if s < stop_after} | ({stop_after} if stop_after > start else set()))

    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    step, t0, frozen_reported = start, time.time(), set()
    for stop in stops:
        losses = []
        while step < stop:
            n = min(steps_per_call(cfg), stop - step)
            batches = None if feed is None else feed(step, steps_per_call(cfg))
            state, loss = advance(sw, state, data, n, batches)
            losses.append((n, loss))
            step += n
            bar.update(n)
        loss = sw.real(sum(n * host(lv) for n, lv in losses) / sum(n for n, _ in losses))
        alive = sw.real(host(state["alive"]))
        rate = (step - start) / max(time.time() - t0, 1e-9)
        bar.set_postfix({"loss": f"{np.mean(loss[alive]):.3f}" if alive.any() else "all frozen",
                         "model-steps/s": f"{rate * sw.size:.1f}"})
        for i in np.flatnonzero(~alive):
            if i not in frozen_reported:
                frozen_reported.add(int(i))
                rundir.warn(f"member {i} ({_describe(sw.members[i])}) diverged (non-finite loss) by step "
                            f"{step}; it is frozen, the others carry on")
        record = {"step": step, "train_loss": [float(v) for v in loss], "frozen": [bool(not a) for a in alive],
                  "steps_per_s": rate}
        if step in evals:
            record["val_loss"], record["test_loss"] = _evaluate_and_save(sw, state, data, step, run_dir, cfg)
        if lead:
            rundir.append_metrics(run_dir, record)
        if step % tc.checkpoint_every == 0 or step == total or step == stop_after:
            save(sw, mngr, step, state)
    bar.close()
    mngr.close()
    return sw, state


def _evaluate_and_save(sw, state, data, step, run_dir, cfg):
    samples, prompts, val, test = evaluate(sw, state, data, step)
    samples, prompts = sw.real(host(samples)), sw.real(host(prompts))  # every process gathers
    val, test = sw.real(host(val)), sw.real(host(test))
    params = jax.tree.map(lambda a: sw.real(host(a)), eval_params(state)) if cfg.eval.save_params else None
    if jax.process_index() == 0:
        tol = min(D.storage_tolerance(sw.spec, D.params(m.data)) for m in sw.members)
        rundir.save_samples(run_dir, step, samples, prompts, cfg.eval.sample_dtype, tol)
        if params is not None:
            rundir.save_params(run_dir, step, params)
    return [float(v) for v in val], [float(v) for v in test]


# --------------------------------------------------------------------------------------------
# Checkpoints of the real members (the padding depends on the device count)
# --------------------------------------------------------------------------------------------
def save(sw: Sweep, mngr, step: int, state) -> None:
    """Checkpoint the real members' rows of ``state`` (every process calls this)."""
    real = state if len(sw.padded) == sw.size else jax.tree.map(lambda a: a[: sw.size], state)
    checkpoint.save(mngr, step, real)


def restore(sw: Sweep, directory, like):
    """Restore the newest readable checkpoint into the (padded, sharded) layout of ``like``.

    Returns (manager, step, state) as ``checkpoint.restore_latest``."""
    if len(sw.padded) == sw.size:
        return checkpoint.restore_latest(directory, sw.cfg.train.keep_checkpoints, like)
    # restore the real members on the host, then pad with copies of the last and place them
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((sw.size, *a.shape[1:]), a.dtype, sharding=cpu), like)
    mngr, step, real = checkpoint.restore_latest(directory, sw.cfg.train.keep_checkpoints, abstract)
    if real is None:
        return mngr, None, None
    n_pad = len(sw.padded) - sw.size

    def pad(a):
        a = np.asarray(a)
        return _put(sw, np.concatenate([a, np.repeat(a[-1:], n_pad, axis=0)]))
    return mngr, step, jax.tree.map(pad, real)


def _describe(m: C.Config) -> str:
    d = m.data
    if d.kind == "images":
        return f"sep_col={d.sep_col}, sep_size={d.sep_size}, seed={m.seeds[0]}"
    if d.kind == "celeba":
        return f"attributes={list(d.attributes)}, seed={m.seeds[0]}"
    return f"m={list(d.m)}, s={list(d.s)}, seed={m.seeds[0]}"


def load_state_params(run_dir, step):
    """Stacked parameters (real members) saved at evaluation ``step`` of a run."""
    cfg = rundir.load_config(run_dir)
    sw = build(cfg, jax.devices()[:1])
    like = jax.eval_shape(jax.vmap(lambda s: diffusion.init_params(sw.net, cfg.model, sw.spec,
                                                                   member_keys(s)["init"])), seeds_array(sw))
    return rundir.load_params(run_dir, step, like)
