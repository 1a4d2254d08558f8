"""The stacked sweep: M members trained at once as one train state. The only module that knows
about the model axis.

A sweep is one pytree whose leaves lead with the model axis [M, ...]. One jitted call moves every
member K steps: ``scan(vmap(train_step))`` (``_advance_local``: a ``lax.scan`` over steps of the
one-member ``step.train_step`` mapped over the members). The map is ``vmap``, or ``lax.map`` in
chunks of vmapped members, or one traced copy per member (``Sweep.strategy``; ``plan`` chooses it
by memory when ``train.strategy`` is "auto"). The model axis is split over the devices (and hosts)
with ``shard_map`` on a 1-D mesh named "models"; a member count that does not divide the device
count is padded with inert copies of the last member (trained, never written).

Whether the network is fast inside XLA loops is decided once, here, where the sweep is built
(``Sweep.loop_safe``, ``nets.loop_safe`` on the mesh's platform): a U-Net with XLA's own
convolutions on CPU (model.conv="xla") takes one step per call and samples in a Python loop.

    state = {"params", "opt", "step", "key", "alive"[, "ema"]}  # each leaf: [M, ...]
    data  = dict(x_train, c_train, y_train, x_val, c_val, y_val, x_test, c_test, y_test)  # [M, N, ...]
    batches = dict(x [M, K, B, ...], c [M, K, B, cond_dim], n [M, K])  # host-fed kinds only
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxconcept import config as C, data as D, diffusion, nets, rundir
from jaxconcept.step import call_rows, eval_loss, eval_params, init_member, member_keys, train_step

AXIS = "models"
STRATEGIES = ("vmap", "map", "unroll")


class Programs(NamedTuple):
    """The jitted programs of a sweep (``Sweep.fns``)."""

    init: Callable  # (seeds [M], data params [M, ...]) -> (state, data)
    advance: Callable  # n -> jitted (state, data, batches) -> (state, mean loss [M]); state donated
    evaluate: Callable  # (state, data, prompts, seeds, step) -> (samples, val [M], test [M])


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
    strategy: str  # "vmap", "map" (chunks of ``chunk`` members) or "unroll" (one copy per member)
    chunk: int  # members per lax.map chunk (strategy "map")
    loop_safe: bool  # the network runs at full speed inside XLA loops (nets.loop_safe)

    @functools.cached_property
    def fns(self) -> Programs:
        """The jitted programs of this sweep, compiled once per Sweep object."""
        return _compile(self)

    @functools.cached_property
    def host_eval(self) -> dict | None:
        """Host-fed kinds: the held-back sets of every (padded) member, numpy [M, N, ...], read once."""
        return D.host_eval_data(self.spec, self.padded) if self.host_fed else None

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def backend(self) -> str:
        """The platform of the mesh's devices ("cpu", "gpu", "tpu")."""
        return self.mesh.devices.flat[0].platform

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

    def over_members(self, fn):
        """``fn`` of one member -> the same function of the (local) stacked members, by strategy:
        ``vmap(fn)``, ``lax.map`` over chunks of ``chunk`` vmapped members, or one traced copy of
        ``fn`` per member ("unroll": no grouped convolutions, no loop). Every argument leads with
        the model axis."""
        if self.strategy == "map":
            return lambda *stacked: jax.lax.map(lambda a: fn(*a), stacked, batch_size=self.chunk)
        if self.strategy == "unroll":
            def unrolled(*stacked):
                n = jax.tree.leaves(stacked)[0].shape[0]
                outs = [fn(*jax.tree.map(lambda a: a[i], stacked)) for i in range(n)]
                return jax.tree.map(lambda *a: jnp.stack(a), *outs)
            return unrolled
        return jax.vmap(fn)

    def sharded(self, fn, n_in: int):
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


def build(cfg: C.Config, devices=None, *, strategy: str | None = None, chunk: int | None = None) -> Sweep:
    """The static sweep of ``cfg``: member configs (padded to the mesh), data spec, network (its
    convolutions resolved for the mesh's platform), mesh, and whether the network is loop-safe.

    Args:
      devices: devices of the model axis (default: all).
      strategy, chunk: the stacking (default ``train.strategy``, ``train.map_batch_size``).
    Raises:
      ValueError: the strategy is "auto": ``plan.build`` resolves it.
    """
    strategy = strategy or cfg.train.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: allowed {', '.join(STRATEGIES)} (plan.build resolves \"auto\")")
    ms = tuple(C.members(cfg))
    mesh = make_mesh(len(ms), devices)
    backend = mesh.devices.flat[0].platform
    n_pad = -len(ms) % mesh.size
    spec = D.spec(ms[0].data)
    return Sweep(cfg=cfg, members=ms, padded=ms + (ms[-1],) * n_pad, spec=spec,
                 net=nets.build(cfg.model, spec, backend), mesh=mesh, strategy=strategy,
                 chunk=chunk or cfg.train.map_batch_size, loop_safe=nets.loop_safe(cfg.model, backend))


def stacked_data_params(sw: Sweep, members=None):
    """Per-member data-generating parameters, stacked on a leading model axis."""
    ps = [D.params(m.data) for m in (members or sw.padded)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ps)


def seeds_array(sw: Sweep, members=None):
    """The members' seeds: [M] int32."""
    return jnp.asarray([m.seeds[0] for m in (members or sw.padded)], jnp.int32)


def train_keys(members) -> np.ndarray:
    """The train keys of member configs: [M, 2] uint32 (what a host feed orders batches by)."""
    return np.stack([np.asarray(member_keys(int(m.seeds[0]))["train"]) for m in members])


def steps_per_call(sw: Sweep) -> int:
    """K: train.steps_per_call, or 1 for a network that must not step inside a scan (not
    ``sw.loop_safe``; its steps are long enough that one call per step costs nothing)."""
    return sw.cfg.train.steps_per_call if sw.loop_safe else 1


# --------------------------------------------------------------------------------------------
# The per-device programs
# --------------------------------------------------------------------------------------------
def _init_local(sw: Sweep, seeds, dparams):
    def one(seed, dp):
        data = {} if sw.host_fed else D.dataset(sw.spec, dp, member_keys(seed)["data"])
        return init_member(sw.cfg, sw.spec, sw.net, seed), data
    if sw.strategy == "unroll":  # initialisers and rendering are elementwise: vmap gives the same bits
        return jax.vmap(one)(seeds, dparams)  # and compiles once, not once per member (8 U-Nets: 400 s)
    return sw.over_members(one)(seeds, dparams)


def _advance_local(sw: Sweep, state, data, batches, n: int):
    """n (static) steps of every local member: one plain step, or a lax.scan of n steps with no
    conditional in its body (on XLA:GPU a lax.cond copies its predicate to the host every step).
    ``advance`` compiles this for K = steps_per_call and for 1 and runs a remainder as single
    steps. batches: None, or host-fed {x, c, n} with leaves [M, n, ...]. Returns (state, mean
    loss [M])."""
    stacked_step = sw.over_members(functools.partial(train_step, sw.cfg, sw.spec, sw.apply_fn))  # vmap(train_step)

    def batch(i):  # the host-fed batches of step i of this call
        return None if batches is None else jax.tree.map(lambda a: a[:, i], batches)

    if n == 1:
        return stacked_step(state, data, batch(0))
    if batches is None and sw.cfg.train.batches == "epochs":  # on-device data: this call's rows, the
        # epochs' permutations computed once per call (``call_rows``), each step's batch gathered below
        idx, n_valid = sw.over_members(lambda st, d: call_rows(sw.cfg.train, d, st["key"], st["step"], n))(state, data)
        take = sw.over_members(lambda d, i: {"x": d["x_train"][i], "c": d["c_train"][i]})
        batch = lambda i: {**take(data, idx[:, i]), "n": n_valid[:, i]}  # noqa: E731

    def body(st, i):  # the barriers keep XLA from fusing across steps: a scanned step is
        # bit for bit the one-step program (without them a scalar's AdamW moment moved an ulp)
        return jax.lax.optimization_barrier(stacked_step(jax.lax.optimization_barrier(st), data, batch(i)))
    # scan(vmap(train_step)): n steps of every member in one program
    state, losses = jax.lax.scan(body, state, jnp.arange(n), unroll=sw.cfg.train.scan_unroll or 1)
    return state, jnp.sum(losses, 0) / n  # losses [n, m]


def _evaluate_local(sw: Sweep, state, data, prompts, seeds, step):
    """Samples and held-back losses of every local member: prompts [m, n_classes, n_samples,
    cond_dim] -> (samples [m, n_classes, n_samples, *x_shape], val [m], test [m])."""
    cfg, spec, apply_fn, ec = sw.cfg, sw.spec, sw.apply_fn, sw.cfg.eval

    def one(st, dat, pr, seed):
        key = jax.random.fold_in(member_keys(seed)["sample"], step)
        params = eval_params(st)
        x = diffusion.sample(apply_fn, cfg.model, params, pr.reshape(-1, pr.shape[-1]), key, x_shape=spec.x_shape,
                             n_steps=ec.sampler_steps, w_cfg=ec.w_cfg, null_cond=D.null_cond(spec),
                             output=ec.sampler_output, loop_safe=sw.loop_safe)
        losses = [eval_loss(cfg, spec, apply_fn, params, dat[f"x_{s}"], dat[f"c_{s}"], jax.random.fold_in(key, i),
                            loop_safe=sw.loop_safe) for i, s in ((1, "val"), (2, "test"))]
        return x.reshape(*pr.shape[:2], *spec.x_shape), *losses
    return sw.over_members(one)(state, data, prompts, seeds)


def _compile(sw: Sweep) -> Programs:
    """The jitted, sharded programs of a sweep (cached per Sweep object by ``Sweep.fns``)."""
    sh = sw.sharding()
    init = jax.jit(sw.sharded(functools.partial(_init_local, sw), 2), out_shardings=sh)
    advance = functools.cache(lambda n: jax.jit(sw.sharded(functools.partial(_advance_local, sw, n=n), 3),
                                                 donate_argnums=0))  # n -> the program of n steps
    evaluate = jax.jit(sw.sharded(functools.partial(_evaluate_local, sw), 4))
    return Programs(init, advance, evaluate)


def abstract_inputs(sw: Sweep):
    """ShapeDtypeStructs (with their shardings) of the K-step ``advance`` program's arguments
    (state, data, batches), as ``init`` and ``advance`` make them: lowering the sweep's own
    jitted advance with these compiles the very program the first real call runs."""
    m, sh = len(sw.padded), sw.sharding()
    one = lambda seed, dp: (init_member(sw.cfg, sw.spec, sw.net, seed),  # noqa: E731 - shapes only
                            {} if sw.host_fed else D.dataset(sw.spec, dp, member_keys(seed)["data"]))
    state, data = jax.eval_shape(jax.vmap(one), jax.ShapeDtypeStruct((m,), jnp.int32),
                                 jax.eval_shape(lambda: stacked_data_params(sw)))
    if sw.host_fed:
        data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in sw.host_eval.items()}
    batches = None
    if sw.host_fed:
        k, b = steps_per_call(sw), sw.cfg.train.batch_size
        batches = {"x": jax.ShapeDtypeStruct((m, k, b, *sw.spec.x_shape), D.host_dtype(sw.spec)),
                   "c": jax.ShapeDtypeStruct((m, k, b, sw.spec.cond_dim), jnp.float32),
                   "n": jax.ShapeDtypeStruct((m, k), jnp.int32)}
    put = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)  # noqa: E731
    return jax.tree.map(put, state), jax.tree.map(put, data), jax.tree.map(put, batches)


# --------------------------------------------------------------------------------------------
# Public API of the stacked state
# --------------------------------------------------------------------------------------------
def init(sw: Sweep, members=None):
    """Stacked train state and per-member datasets, rendered on device, sharded over the mesh.

    ``members`` (default: the sweep's own, padded) may name other member configs of the same
    count and shapes, reusing the compiled function (e.g. to initialise one member at a time).
    """
    seeds = put(sw, seeds_array(sw, members))
    dparams = jax.tree.map(lambda a: put(sw, a), stacked_data_params(sw, members))
    state, data = sw.fns.init(seeds, dparams)
    if sw.host_fed:  # held-back sets from the host; the training set streams (``data.host_feed``)
        held = sw.host_eval if members is None else D.host_eval_data(sw.spec, members)
        data = {k: put(sw, v) for k, v in held.items()}
    return state, data


def advance(sw: Sweep, state, data, n: int, batches=None):
    """Advance every member ``n`` <= ``steps_per_call(sw)`` steps. Returns (state, mean loss [M]).

    n = K runs the compiled K-step program; a remainder n < K runs n calls of a one-step program
    (two programs in all, whatever the distances to evaluation points; the same numbers as any
    other split of the steps). ``state`` is donated.
    ``batches``: for host-fed data, numpy {x [M, K, B, ...], c [M, K, B, cond_dim], n [M, K]}."""
    k = steps_per_call(sw)
    assert 0 < n <= k

    def steps(i, j):  # the host-fed batches of steps i..j-1 of this call
        return None if batches is None else jax.tree.map(lambda a: put(sw, np.asarray(a)[:, i:j]), batches)
    if n == k:
        return sw.fns.advance(k)(state, data, steps(0, k))
    total = 0.0
    for i in range(n):
        state, loss = sw.fns.advance(1)(state, data, steps(i, i + 1))
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
    prompts = put(sw, _prompts_host(sw))
    seeds = put(sw, np.asarray(seeds_array(sw)))
    samples, val, test = sw.fns.evaluate(state, data, prompts, seeds, jnp.asarray(step, jnp.int32))
    return samples, prompts, val, test


def put(sw: Sweep, a):
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


def load_params(run_dir, step):
    """Stacked parameters [M, ...] (real members, numpy) saved at evaluation ``step`` of a run.

    Raises RunDirError: the run or its parameter file is missing, damaged or of another model."""
    cfg = rundir.load_config(run_dir)
    ms = C.members(cfg)
    spec = D.spec(ms[0].data)
    net = nets.build(cfg.model, spec)
    seeds = jnp.asarray([m.seeds[0] for m in ms], jnp.int32)
    like = jax.eval_shape(jax.vmap(lambda s: diffusion.init_params(net, cfg.model, spec, member_keys(s)["init"])),
                          seeds)
    return rundir.load_params(run_dir, step, like)
