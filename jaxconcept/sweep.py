"""The sweep engine: many models trained at once as one stacked train state.

A sweep of M members is one pytree whose leaves carry a leading model axis. One jitted call
(`advance`) moves every member up to K steps: a `lax.scan` over steps whose body maps the single-
member `train_step` over the model axis (`vmap`; or `lax.map` in chunks, or one traced copy per
member, `train.strategy`). The model axis is split over all devices (and hosts) with `shard_map`
on a 1-D mesh named "models". Conv nets on CPU take one step per call without scan (XLA:CPU's
slow path for convolutions in loops). A single run is a sweep of one. This is the only module
that knows about the model axis.

    state = {"params", "opt", "step", "key", "alive"[, "ema"]}  # each leaf: [M, ...]
    data  = dict(x_train, c_train, y_train, x_val, c_val, y_val)  # each leaf: [M, N, ...]
"""
from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxconcept import checkpoint, data as D, diffusion, nets, rundir
from jaxconcept import config as C

AXIS = "models"


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
    """Every random stream of a member derives from its seed: init, data, batches, samples."""
    root = jax.random.PRNGKey(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "data", "train", "sample"))}


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


def train_step(cfg: C.Config, spec: D.DataSpec, apply_fn, state: dict, data: dict):
    """One AdamW step of one member on a batch drawn from its own training set.

    A step whose loss or update is not finite is not applied and freezes the member for good.
    Returns (new_state, loss).
    """
    tc = cfg.train
    key = jax.random.fold_in(state["key"], state["step"])
    k_batch, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_batch, (tc.batch_size,), 0, data["x_train"].shape[0])
    x, cond = data["x_train"][idx], data["c_train"][idx]  # [B, *x_shape], [B, cond_dim]

    def loss(params):
        return diffusion.loss_fn(apply_fn, cfg.model, params, x, cond, k_loss, train=True,
                                 p_cfg=tc.p_cfg, null_cond=D.null_cond(spec))

    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    updates, opt = optimizer(tc).update(grads, state["opt"], state["params"])
    ok = state["alive"] & jnp.isfinite(value) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    params = optax.apply_updates(state["params"], updates)
    new = {"params": keep(params, state["params"]),
           "opt": keep(opt, state["opt"]), "step": state["step"] + 1, "key": state["key"], "alive": ok}
    if "ema" in state:
        new["ema"] = keep(optax.incremental_update(params, state["ema"], 1.0 - tc.ema), state["ema"])
    return new, value


def val_loss(cfg: C.Config, spec: D.DataSpec, apply_fn, params, data, key):
    """Mean loss over ``eval.val_batches`` validation batches (network in eval mode)."""
    n, b = data["x_val"].shape[0], cfg.train.batch_size
    def one(i):
        k = jax.random.fold_in(key, i)
        idx = jax.random.randint(jax.random.fold_in(k, 1), (b,), 0, n)
        return diffusion.loss_fn(apply_fn, cfg.model, params, data["x_val"][idx], data["c_val"][idx], k,
                                 train=False)[0]
    return jnp.mean(jax.vmap(one)(jnp.arange(cfg.eval.val_batches)))


# --------------------------------------------------------------------------------------------
# The stacked sweep
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Sweep:
    """Everything static about a sweep; the arrays (state, data) are passed around separately."""

    cfg: C.Config
    members: tuple  # one scalar C.Config per member
    spec: D.DataSpec
    net: object
    mesh: Mesh

    @functools.cached_property
    def fns(self):
        """The jitted (init, advance, evaluate) of this sweep, compiled once per Sweep object."""
        return _compile(self)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def apply_fn(self):
        return diffusion.make_apply(self.net)

    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    def _map(self, fn, *stacked):
        """Map a one-member function over the model axis with the configured strategy."""
        if self.cfg.train.strategy == "map":
            return jax.lax.map(lambda a: fn(*a), stacked, batch_size=self.cfg.train.map_batch_size)
        if self.cfg.train.strategy == "unroll":  # one copy of fn per member: no grouped convs, no loop
            n = jax.tree.leaves(stacked)[0].shape[0]
            outs = [fn(*jax.tree.map(lambda a: a[i], stacked)) for i in range(n)]
            return jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return jax.vmap(fn)(*stacked)

    def _sharded(self, fn, n_in: int, n_out: int | None = None):
        """jit(shard_map(fn)) over the model axis: each device runs ``fn`` on its members.

        Inputs/outputs are pytrees whose leaves lead with the model axis; extra trailing
        arguments (beyond n_in) are replicated scalars.
        """
        if self.mesh.size == 1 and jax.process_count() == 1:
            return fn  # one device: plain jit (XLA:CPU runs convolutions nested in shard_map ~15x slower)
        spec = P(AXIS)
        def wrapped(*args):
            in_specs = tuple([spec] * n_in + [P()] * (len(args) - n_in))
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=spec,
                                 check_vma=False)(*args)
        return wrapped


def make_mesh(n_members: int, devices=None) -> Mesh:
    """A 1-D 'models' mesh over the largest number of devices that divides the member count."""
    devices = list(devices if devices is not None else jax.devices())
    n = max(d for d in range(1, len(devices) + 1) if n_members % d == 0)
    return Mesh(np.array(devices[:n]), (AXIS,))


def build(cfg: C.Config, devices=None) -> Sweep:
    """The static sweep of ``cfg``: member configs, data spec, network, device mesh."""
    ms = tuple(C.members(cfg))
    spec = D.spec(ms[0].data)
    return Sweep(cfg=cfg, members=ms, spec=spec, net=nets.build(cfg.model, spec), mesh=make_mesh(len(ms), devices))


def stacked_data_params(sw: Sweep, members=None):
    """Per-member data-generating parameters, stacked on a leading model axis."""
    ps = [D.params(m.data) for m in (members or sw.members)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ps)


def seeds_array(sw: Sweep, members=None):
    return jnp.asarray([m.seeds[0] for m in (members or sw.members)], jnp.int32)


def steps_per_call(cfg: C.Config) -> int:
    """K: train.steps_per_call, or 1 for conv nets on CPU, which must not step inside a scan (and
    whose steps are long enough that one call per step costs nothing)."""
    return 1 if diffusion.python_loop(cfg.model) else cfg.train.steps_per_call


def _compile(sw: Sweep):
    """The jitted functions of a sweep (cached per static sweep)."""
    cfg, spec, apply_fn = sw.cfg, sw.spec, sw.apply_fn
    K = steps_per_call(cfg)

    def init_local(seeds, dparams):
        def one(seed, dp):
            return init_member(cfg, spec, sw.net, seed), D.dataset(spec, dp, member_keys(seed)["data"])
        return sw._map(one, seeds, dparams)

    def advance_local(state, data, n):
        # K scan steps; steps i >= n are skipped (n is not batched, so lax.cond stays a branch):
        # one compiled function serves every distance to the next evaluation point. XLA:CPU runs
        # convolutions nested in a loop or conditional 10-20x slower than at top level (even in a
        # fully unrolled scan; jax-ml/jax#12868), so conv nets on CPU take K = 1 plain step.
        def run(s):
            return sw._map(functools.partial(train_step, cfg, spec, apply_fn), s, data)

        if diffusion.python_loop(cfg.model):  # K == 1 == n
            return run(state)

        def body(st, i):
            return jax.lax.cond(i < n, run, lambda s: (s, jnp.zeros(s["step"].shape, jnp.float32)), st)
        state, losses = jax.lax.scan(body, state, jnp.arange(K), unroll=cfg.train.scan_unroll or 1)
        w = (jnp.arange(K) < n)[:, None]  # losses [K, m]
        mean = jnp.sum(jnp.where(w, losses, 0.0), 0) / jnp.maximum(n, 1)
        return state, mean

    def evaluate_local(state, data, prompts, seeds, step):
        # prompts [m, n_classes, cond_dim] -> samples [m, n_classes, n_samples, *x_shape]
        ec = cfg.eval
        def one(st, dat, pr, seed):
            key = jax.random.fold_in(member_keys(seed)["sample"], step)
            cond = jnp.repeat(pr, ec.n_samples, axis=0)
            params = eval_params(st)
            x = diffusion.sample(apply_fn, cfg.model, params, cond, key, x_shape=spec.x_shape,
                                 n_steps=ec.sampler_steps, w_cfg=ec.w_cfg, null_cond=D.null_cond(spec))
            vl = val_loss(cfg, spec, apply_fn, params, dat, jax.random.fold_in(key, 1))
            return x.reshape(pr.shape[0], ec.n_samples, *spec.x_shape), vl
        return sw._map(one, state, data, prompts, seeds)

    sh = sw.sharding()
    init = jax.jit(sw._sharded(init_local, 2), out_shardings=sh)
    advance = jax.jit(sw._sharded(advance_local, 2), donate_argnums=0)
    evaluate = jax.jit(sw._sharded(evaluate_local, 4))
    return init, advance, evaluate


def init(sw: Sweep, members=None):
    """Stacked train state and per-member datasets, rendered on device, sharded over the mesh.

    ``members`` (default: the sweep's own) may name other member configs of the same count and
    shapes, reusing the compiled function (e.g. to initialise one member at a time).
    """
    init_fn, _, _ = sw.fns
    sh = sw.sharding()
    seeds = jax.device_put(seeds_array(sw, members), sh)
    dparams = jax.device_put(stacked_data_params(sw, members), sh)
    return init_fn(seeds, dparams)


def advance(sw: Sweep, state, data, n: int):
    """Advance every member ``n`` <= ``steps_per_call(cfg)`` steps. Returns (state, mean loss [M])."""
    _, adv, _ = sw.fns
    assert 0 < n <= steps_per_call(sw.cfg)
    return adv(state, data, jnp.asarray(n, jnp.int32))


def evaluate(sw: Sweep, state, data, step: int):
    """Samples of every class at its class-mean prompt and validation loss, for every member.

    Returns (samples [M, n_classes, n_samples, *x_shape], prompts [M, n_classes, cond_dim], val [M]).
    """
    _, _, ev = sw.fns
    sh = sw.sharding()
    prompts = jax.device_put(jax.vmap(lambda p: D.prompts(sw.spec, p))(stacked_data_params(sw)), sh)
    seeds = jax.device_put(seeds_array(sw), sh)
    samples, val = ev(state, data, prompts, seeds, jnp.asarray(step, jnp.int32))
    return samples, prompts, val


def _host(x):
    """A (possibly multi-host) global array as a numpy array on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# A run on disk: train with evaluation, checkpoints and resume
# --------------------------------------------------------------------------------------------
def _check_run_dir(cfg: C.Config, run_dir: Path) -> None:
    p = run_dir / "config.json"
    if p.exists():
        old, new = _flat(json.loads(p.read_text())), _flat(C.to_dict(cfg))
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diffs:
            raise RunError(f"{run_dir} holds a run with a different config ({'; '.join(diffs)}); "
                           "use another --out, or the same config to resume")


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _members_json(sw: Sweep) -> list[dict]:
    out = []
    for i, m in enumerate(sw.members):
        sig = D.concept_signal(m.data)
        out.append({"index": i, "seed": m.seeds[0], "sep_col": m.data.sep_col, "sep_size": m.data.sep_size,
                    "m": list(m.data.m), "s": list(m.data.s), "signal": {k: float(v) for k, v in sig.items()}})
    return out


def train(cfg: C.Config, run_dir, *, progress: bool = True, devices=None, stop_after: int | None = None):
    """Train the sweep ``cfg`` into ``run_dir`` with evaluation, checkpoints and resume.

    Running the same command again continues from the newest readable checkpoint and ends with
    the same parameters and samples as an uninterrupted run.

    Args:
      cfg: the (sweep) config.
      run_dir: output directory (created; must hold the same config if it exists).
      progress: show a tqdm progress bar.
      devices: devices for the model axis (default: all).
      stop_after: stop (after checkpointing) once this step is reached; for tests and budgets.
    Returns:
      (sweep, final stacked state).
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    _check_run_dir(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sw = build(cfg, devices)
    if jax.process_index() == 0:
        C.save(cfg, run_dir / "config.json")
        if not (run_dir / "members.json").exists():
            (run_dir / "members.json").write_text(json.dumps(_members_json(sw), indent=1) + "\n")

    state, data = init(sw)
    mngr = checkpoint.manager(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    start, restored = checkpoint.restore_latest(mngr, state)
    if restored is not None:
        state = restored
    start = start or 0
    _truncate_metrics(run_dir, start)

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
            state, loss = advance(sw, state, data, n)
            losses.append((n, loss))
            step += n
            bar.update(n)
        loss = sum(n * _host(lv) for n, lv in losses) / sum(n for n, _ in losses)
        alive = _host(state["alive"])
        rate = (step - start) / max(time.time() - t0, 1e-9)
        bar.set_postfix({"loss": f"{np.nanmean(np.where(alive, loss, np.nan)):.3f}",
                         "model-steps/s": f"{rate * sw.size:.1f}"})
        for i in np.flatnonzero(~alive):
            if i not in frozen_reported:
                frozen_reported.add(int(i))
                warnings.warn(f"member {i} ({_describe(sw.members[i])}) diverged (non-finite loss) by step "
                              f"{step}; it is frozen, the others carry on", stacklevel=2)
        record = {"step": step, "train_loss": [float(v) for v in loss], "frozen": [bool(not a) for a in alive],
                  "steps_per_s": rate}
        if step in evals:
            record["val_loss"] = _evaluate_and_save(sw, state, data, step, run_dir, cfg)
        _append_metrics(run_dir, record)
        if step % tc.checkpoint_every == 0 or step == total or step == stop_after:
            checkpoint.save(mngr, step, state)
    bar.close()
    return sw, state


def _evaluate_and_save(sw, state, data, step, run_dir, cfg):
    samples, prompts, val = evaluate(sw, state, data, step)
    if jax.process_index() == 0:
        rundir.save_samples(run_dir, step, _host(samples), _host(prompts))
        if cfg.eval.save_params:
            rundir.save_params(run_dir, step, jax.tree.map(_host, eval_params(state)))
    return [float(v) for v in _host(val)]


def _append_metrics(run_dir: Path, record: dict) -> None:
    if jax.process_index() == 0:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines past the restored step (they will be recomputed identically)."""
    keep = [r for r in rundir.load_metrics(run_dir) if r["step"] <= step]
    if jax.process_index() == 0:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))


def _describe(m: C.Config) -> str:
    d = m.data
    if d.kind == "images":
        return f"sep_col={d.sep_col}, sep_size={d.sep_size}, seed={m.seeds[0]}"
    return f"m={list(d.m)}, s={list(d.s)}, seed={m.seeds[0]}"


def load_state_params(run_dir, step):
    """Stacked parameters saved at evaluation ``step`` of a run, with the structure of the model."""
    cfg = rundir.load_config(run_dir)
    sw = build(cfg)
    like = jax.eval_shape(jax.vmap(lambda s: diffusion.init_params(sw.net, cfg.model, sw.spec,
                                                                   member_keys(s)["init"])), seeds_array(sw))
    return rundir.load_params(run_dir, step, like)
