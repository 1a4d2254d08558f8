"""The stack: M members of a sweep (one group) trained at once as one train state, and its programs.
The engine's model axis is made here; checkpoint, loop and ``runs.Run.params`` only slice the
real members off it.

A stack is one pytree whose leaves lead with the model axis [M, ...]. One compiled call moves
every member n <= K steps: ``fori_loop(vmap(train_step))`` (``_advance_local``: a loop over steps
of the one-member ``step.train_step`` mapped over the members; n is an argument, so one program
serves every call length). The map is ``vmap``, or ``lax.map`` in chunks of vmapped members, or
one traced copy per member (``Stack.strategy``; ``plan`` chooses it when ``train.strategy`` is
"auto"). The model axis is split over the devices (and hosts) with ``shard_map`` on a 1-D mesh
named "models"; a member count that does not divide the device count is padded with inert copies
of the last member (trained, never written). The three programs (init, advance, evaluate) are
compiled ahead of time, side by side (``Stack.programs``, ``programs``).

Whether the network is fast inside XLA loops is decided once, here, where the sweep is built
(``Stack.loop_safe``, ``nets.loop_safe`` on the mesh's platform): a U-Net with XLA's own
convolutions on CPU (model.conv="xla") takes one step per call and samples in a Python loop.

    state = step.TrainState(params [M, P], mu, nu, ema, step [M], key [M, 2], alive [M], hyper {name: [M]})
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxconcept import config as C, data as D, vdm, nets
from jaxconcept.train.programs import compile_programs
from jaxconcept.train.step import (Active, Layout, call_rows, eval_params, held_back_losses, hyper_values, init_member,
                             member_keys, model_settings, train_step)

AXIS = "models"
STRATEGIES = ("vmap", "map", "unroll")


class Programs(NamedTuple):
    """The compiled programs of a sweep (``Stack.programs``), each called with arrays placed as
    ``abstract_inputs`` says."""

    init: Callable  # (seeds [M], data params [M, ...], hyper {name: [M]}) -> (state, data)
    advance: Callable  # (state, data, batches, n i32[]) -> (state, mean loss [M]): n <= K steps; state donated
    evaluate: Callable  # (state, data, prompts, seeds, step) -> (samples, val [M], test [M])


@dataclass(frozen=True, eq=False)
class Stack:
    """Everything static about a sweep (one group of members: one set of programs); the arrays
    (state, data) are passed around separately.

    ``members`` are the real members; ``padded`` adds inert copies of the last one so that the
    model axis divides the mesh. Arrays carry the padded axis; what is written is sliced to the
    real members (``real``). ``cfg`` holds the settings every member shares (its per-member
    fields, ``config.PER_MEMBER``, are read from the members, never from it).
    """

    cfg: C.Config
    members: tuple  # one scalar C.Config per real member, all of one group (``config.groups``)
    padded: tuple  # members + inert copies of the last one
    spec: D.DataSpec
    net: object
    mesh: Mesh
    strategy: str  # "vmap", "map" (chunks of ``chunk`` members) or "unroll" (one copy per member)
    chunk: int  # members per lax.map chunk (strategy "map")
    loop_safe: bool  # the network runs at full speed inside XLA loops (nets.loop_safe)

    @functools.cached_property
    def jitted(self) -> Programs:
        """The jitted (not yet compiled) programs of this sweep."""
        return _jit(self)

    @functools.cached_property
    def _compiled(self) -> dict:
        return {}

    def programs(self, names=Programs._fields) -> Programs:
        """The compiled programs (``compile``): those not compiled yet are compiled now, side by
        side; the others are None unless compiled before."""
        missing = [n for n in names if n not in self._compiled]
        if missing:
            self._compiled.update(compile_programs(self, missing))
        return Programs(*(self._compiled.get(n) for n in Programs._fields))

    @functools.cached_property
    def layout(self):
        """Where each parameter leaf sits in a member's flat parameter vector (``step.Layout``)."""
        return Layout.of(jax.eval_shape(lambda k: vdm.init_params(self.net, self.cfg.model, self.spec, k),
                                        jax.random.PRNGKey(0)))

    @functools.cached_property
    def data_params(self):
        """The (padded) members' data-generating parameters, stacked (numpy [M, ...])."""
        return stacked_data_params(self, self.padded)

    @functools.cached_property
    def active(self) -> Active:
        """The optional parts the programs hold, decided from every member (``step.Active``)."""
        return Active.of(self.members)

    @property
    def steps_per_call(self) -> int:
        """K: train.steps_per_call, or 1 for a network that must not step inside a loop (not
        ``loop_safe``; its steps are long enough that one call per step costs nothing)."""
        return self.cfg.train.steps_per_call if self.loop_safe else 1

    @property
    def uses_ema(self) -> bool:
        """The state holds a moving average (some member has train.ema > 0)."""
        return self.active.ema

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
        return vdm.make_apply(self.net)

    @property
    def host_fed(self) -> bool:
        return self.spec.kind in D.HOST_FED

    def real(self, x):
        """The real members' rows of a padded stacked array (numpy)."""
        return x[: self.size]

    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

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
        spec = PartitionSpec(AXIS)

        def wrapped(*args):
            in_specs = tuple([spec] * n_in + [PartitionSpec()] * (len(args) - n_in))
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
        wrapped.__name__ = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", "program"))
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


def build(cfg: C.Config, devices=None, *, strategy: str | None = None, chunk: int | None = None,
          members=None) -> Stack:
    """The static sweep of ``cfg``: member configs (padded to the mesh), data spec, network (its
    convolutions resolved for the mesh's platform), mesh, and whether the network is loop-safe.

    Args:
      devices: devices of the model axis (default: all).
      strategy, chunk: the stacking (default ``train.strategy``, ``train.map_batch_size``).
      members: the member configs, one group's (default ``C.members(cfg)``); ``cfg`` then gives
        the settings they share (e.g. the group's first member).
    Raises:
      ValueError: the strategy is "auto" (``plan.build`` resolves it), or the members are of
        several groups (``config.groups``: each group is a sweep of its own).
    """
    strategy = strategy or cfg.train.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: allowed {', '.join(STRATEGIES)} (plan.build resolves \"auto\")")
    ms = tuple(C.members(cfg) if members is None else members)
    n_groups = len(C.groups(cfg, ms))
    if n_groups > 1:
        raise ValueError(f"the members are of {n_groups} groups (they differ in {', '.join(C.group_fields(cfg))}): "
                         "build one sweep per group (config.groups; loop.train trains them one after another)")
    mesh = make_mesh(len(ms), devices)
    backend = mesh.devices.flat[0].platform
    n_pad = -len(ms) % mesh.size
    spec = D.spec(ms[0].data)
    return Stack(cfg=cfg, members=ms, padded=ms + (ms[-1],) * n_pad, spec=spec,
                 net=nets.build(cfg.model, spec, backend), mesh=mesh, strategy=strategy,
                 chunk=chunk or cfg.train.map_batch_size, loop_safe=nets.loop_safe(cfg.model, backend))


def stacked_data_params(sw: Stack, members=None):
    """Per-member data-generating parameters, stacked on a leading model axis (numpy)."""
    if members is None:
        return sw.data_params
    ps = [D.params(m.data) for m in members]
    return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *ps)


def seeds_array(sw: Stack, members=None) -> np.ndarray:
    """The members' seeds: [M] int32."""
    return np.asarray([m.seeds[0] for m in (members or sw.padded)], np.int32)


def train_keys(members) -> np.ndarray:
    """The train keys of member configs: [M, 2] uint32 (what a host feed orders batches by)."""
    return np.asarray(jax.jit(jax.vmap(lambda s: member_keys(s)["train"]))(np.asarray([m.seeds[0] for m in members],
                                                                                      np.int32)))


# --------------------------------------------------------------------------------------------
# The per-device programs
# --------------------------------------------------------------------------------------------
def init_local(sw: Stack, seeds, dparams, hyper):
    def one(seed, dp, hp):
        data = {} if sw.host_fed else D.dataset(sw.spec, dp, member_keys(seed)["data"])
        return init_member(sw.cfg, sw.spec, sw.net, sw.layout, seed, hp, ema=sw.active.ema), data
    if sw.strategy == "unroll":  # initialisers and rendering are elementwise: vmap gives the same bits
        return jax.vmap(one)(seeds, dparams, hyper)  # and compiles once, not once per member (8 U-Nets: 400 s)
    return sw.over_members(one)(seeds, dparams, hyper)


def _advance_local(sw: Stack, state, data, batches, n):
    """n (traced, 1 <= n <= K) steps of every local member, as one ``fori_loop``: one program for
    every call length (a call that ends at an evaluation point between multiples of K needs no
    program of its own) and no conditional in the loop (on XLA:GPU a lax.cond copies its
    predicate to the host every step). batches: None, or host-fed {x, c, n} with leaves
    [M, K, ...] (the first n are used). Returns (state, mean loss [M])."""
    stacked_step = sw.over_members(functools.partial(train_step, sw.cfg, sw.spec, sw.net, sw.layout,
                                                     active=sw.active))

    def batch(i):  # the host-fed batches of step i of this call
        return None if batches is None else jax.tree.map(lambda a: a[:, i], batches)

    k = sw.steps_per_call
    if k == 1:
        return stacked_step(state, data, batch(0))
    if batches is None and sw.cfg.train.batches == "epochs":  # on-device data: this call's rows, the
        # epochs' permutations computed once per call (``call_rows``), each step's batch gathered below
        idx, n_valid = sw.over_members(lambda st, d: call_rows(sw.cfg.train, d, st.key, st.step, k))(state, data)
        take = sw.over_members(lambda d, i: {"x": d["x_train"][i], "c": d["c_train"][i]})
        batch = lambda i: {**take(data, idx[:, i]), "n": n_valid[:, i]}  # noqa: E731

    def body(i, carry):  # the barriers keep XLA from fusing across steps: a step in the loop is
        st, total = carry  # bit for bit the same whatever the call's length
        st, loss = stacked_step(jax.lax.optimization_barrier(st), data, batch(i))
        return jax.lax.optimization_barrier((st, total + loss))
    total = jnp.zeros(jax.tree.leaves(state)[0].shape[:1], jnp.float32)
    state, total = jax.lax.fori_loop(0, n, body, (state, total))
    return state, total / n


def _evaluate_local(sw: Stack, state, data, prompts, seeds, step):
    """Samples and held-back losses of every local member: prompts [m, n_classes, n_samples,
    cond_dim] -> (samples [m, n_classes, n_samples, *x_shape], val [m], test [m])."""
    cfg, spec, apply_fn, ec, active = sw.cfg, sw.spec, sw.apply_fn, sw.cfg.eval, sw.active

    def one(st, dat, pr, seed):
        key = jax.random.fold_in(member_keys(seed)["sample"], step)
        params = sw.layout.unravel(eval_params(st))
        model = model_settings(cfg.model, st.hyper)
        w_cfg = st.hyper["w_cfg"] if active.guidance else 1.0
        x = vdm.sample(apply_fn, model, params, pr.reshape(-1, pr.shape[-1]), key,
                             **vdm.sampler_args(ec, spec, loop_safe=sw.loop_safe, w_cfg=w_cfg))
        val, test = held_back_losses(cfg, spec, apply_fn, params, [(dat["x_val"], dat["c_val"]),
                                                                  (dat["x_test"], dat["c_test"])],
                                     [jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)], loop_safe=sw.loop_safe,
                                     model=model, p_cfg=st.hyper["p_cfg"] if active.p_cfg else 0.0, w_cfg=w_cfg)
        return x.reshape(*pr.shape[:2], *spec.x_shape), val, test
    return sw.over_members(one)(state, data, prompts, seeds)


def _jit(sw: Stack) -> Programs:
    """The jitted, sharded programs of a sweep (``Stack.jitted``)."""
    init = jax.jit(sw.sharded(functools.partial(init_local, sw), 3), out_shardings=sw.sharding())
    advance = jax.jit(sw.sharded(functools.partial(_advance_local, sw), 3), donate_argnums=0)
    evaluate = jax.jit(sw.sharded(functools.partial(_evaluate_local, sw), 4))
    return Programs(init, advance, evaluate)


# --------------------------------------------------------------------------------------------
# Public API of the stacked state
# --------------------------------------------------------------------------------------------
def init(sw: Stack, members=None):
    """Stacked train state and per-member datasets, rendered on device, sharded over the mesh.

    ``members`` (default: the sweep's own, padded) may name other member configs of the same
    count and shapes, reusing the compiled program (e.g. to initialise one member at a time).
    """
    ms = members or sw.padded
    seeds = put(sw, seeds_array(sw, ms))
    dparams = jax.tree.map(lambda a: put(sw, a), stacked_data_params(sw, ms))
    hyper = {k: put(sw, v) for k, v in hyper_values(ms).items()}
    state, data = sw.programs(("init",)).init(seeds, dparams, hyper)
    if sw.host_fed:  # held-back sets from the host; the training set streams (``data.host_feed``)
        held = sw.host_eval if members is None else D.host_eval_data(sw.spec, members)
        data = {k: put(sw, v) for k, v in held.items()}
    return state, data


def advance(sw: Stack, state, data, n: int, batches=None):
    """Advance every member ``n`` <= ``sw.steps_per_call`` steps with the one compiled training
    program (n is an argument of it). Returns (state, mean loss [M]). ``state`` is donated.
    ``batches``: for host-fed data, numpy {x [M, K, B, ...], c [M, K, B, cond_dim], n [M, K]}.
    Raises ValueError: n outside 1..steps_per_call."""
    k = sw.steps_per_call
    if not (isinstance(n, (int, np.integer)) and 0 < n <= k):
        raise ValueError(f"n={n!r} is invalid: allowed an integer in 1..{k} (Stack.steps_per_call: one call of the "
                         "training program; call advance again for more steps)")
    if batches is not None:
        batches = jax.tree.map(lambda a: put(sw, np.asarray(a)[:, :k]), batches)
    return sw.programs(("advance",)).advance(state, data, batches, scalar(sw, n))


def scalar(sw: Stack, v: int):
    """An int32 scalar replicated over the sweep's mesh (the step count, the step)."""
    return jax.device_put(np.int32(v), sw.replicated())


@functools.lru_cache(maxsize=8)
def _prompts_host(sw: Stack) -> np.ndarray:
    """Evaluation prompts of every (padded) member, drawn once per member: [M, n_classes, n, cond_dim]."""
    ec = sw.cfg.eval

    def one(dp, seed):
        return D.eval_prompts(sw.spec, dp, jax.random.fold_in(member_keys(seed)["data"], 1), ec.n_samples, ec.prompts)
    return np.asarray(jax.jit(jax.vmap(one))(stacked_data_params(sw), seeds_array(sw)))


def evaluate(sw: Stack, state, data, step: int):
    """Samples of every class and the validation and held-out losses, for every (padded) member.

    Returns (samples [M, n_classes, n_samples, *x_shape], prompts [M, n_classes, n_samples,
    cond_dim], val [M], test [M]) as global arrays (``host`` gathers them).
    """
    prompts = put(sw, _prompts_host(sw))
    seeds = put(sw, seeds_array(sw))
    samples, val, test = sw.programs(("evaluate",)).evaluate(state, data, prompts, seeds, scalar(sw, step))
    return samples, prompts, val, test


def put(sw: Stack, a):
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
