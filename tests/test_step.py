"""One member's training step (jaxconcept/step.py) and the programs a run compiles: the flat
AdamW against optax's per-leaf one, the persistent compilation cache across processes, one
training program for every call length, and the measured choice of stacking."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconcept import config as C, vdm, nets
from jaxconcept.train import plan, stack
from jaxconcept.data import spec as data_spec
from jaxconcept.train.step import Layout, TrainState, adamw, hyper_values


def _tiny_params():
    cfg = C.preset("vec_tiny")
    sp = data_spec(cfg.data)
    return cfg, vdm.init_params(nets.build(cfg.model, sp), cfg.model, sp, jax.random.PRNGKey(0))


@pytest.mark.parametrize("clip", [1e-2, 1e3])  # the gradient clipped, and not
def test_flat_adamw_is_optax_per_leaf_adamw_with_clipping(clip):
    cfg, tree = _tiny_params()
    tc = C.override(cfg, [f"train.grad_clip={clip}", "train.weight_decay=0.05", "train.lr=0.003", "train.ema=0.9"]).train
    layout = Layout.of(tree)
    flat = layout.ravel(tree)
    hyper = {k: jnp.float32(v[0]) for k, v in hyper_values([C.Config(train=tc)]).items()}
    state = TrainState(params=flat, mu=jnp.zeros_like(flat), nu=jnp.zeros_like(flat), ema=flat, step=jnp.int32(0),
                       key=jax.random.PRNGKey(1), alive=jnp.bool_(True), hyper=hyper)
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), optax.adamw(tc.lr, weight_decay=tc.weight_decay))
    ref, opt, ema = tree, tx.init(tree), tree

    @jax.jit
    def both(state, ref, opt, ema, i):  # one program for both optimisers (eager optax compiles op by op)
        grads = jax.tree.map(lambda a: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(2), i), a.shape), ref)
        state = adamw(state, layout.ravel(grads), jnp.float32(1.0))
        upd, opt = tx.update(grads, opt, ref)
        ref = optax.apply_updates(ref, upd)
        return state, ref, opt, jax.tree.map(lambda e, p: tc.ema * e + (1 - tc.ema) * p, ema, ref)
    for i in range(6):
        state, ref, opt, ema = both(state, ref, opt, ema, i)
    step = jax.jit(adamw)
    got, got_ema = layout.unravel(state.params), layout.unravel(state.ema)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(got_ema), jax.tree.leaves(ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(state.step) == 6 and bool(state.alive)
    assert not np.allclose(layout.ravel(ref), flat)  # the steps moved the parameters
    frozen = step(state, jnp.full_like(state.params, jnp.nan), jnp.float32(1.0))  # not finite: not applied
    assert not bool(frozen.alive)
    np.testing.assert_array_equal(frozen.params, state.params)


def test_layout_round_trips_with_leading_axes():
    _, tree = _tiny_params()
    layout = Layout.of(tree)
    flat = np.stack([np.asarray(layout.ravel(tree))] * 3)  # [3, P], numpy
    back = layout.unravel(flat)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert a.shape == (3, *b.shape)
        np.testing.assert_array_equal(a[2], b)
    with pytest.raises(ValueError, match="float32"):
        Layout.of({"a": jnp.zeros(3, jnp.int32)})


def _train(run, cache, *sets):
    env = dict(os.environ, JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1")
    cmd = [sys.executable, "-m", "jaxconcept", "train", "--preset", "vec_tiny", "--no-progress", "--compile-cache",
           str(cache), *[a for s in sets for a in ("--set", s)], "--out", str(run)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stderr.splitlines()
    return ([ln.split("Compiling ")[1].split(" ")[0] for ln in lines if "Compiling " in ln],
            sum("PERSISTENT COMPILATION CACHE MISS" in ln for ln in lines),
            sum("Persistent compilation cache hit" in ln for ln in lines))


def test_a_run_compiles_few_programs_once_and_a_second_process_compiles_nothing(tmp_path):
    # evaluation points between multiples of K = 5 (3, 7) and the end (9): one training program for all
    sets = ["train.steps=9", "train.steps_per_call=5", "eval.steps=[3,7,9]", "seeds=[0,1]"]
    programs, misses, _ = _train(tmp_path / "a", tmp_path / "xla", *sets)
    assert programs.count("jit(_advance_local)") == 1 and programs.count("jit(init_local)") == 1
    assert programs.count("jit(_evaluate_local)") == 1
    assert len(programs) <= 8 and misses == len(programs), programs
    again, misses, hits = _train(tmp_path / "b", tmp_path / "xla", *sets)  # a fresh process, the same config
    assert misses == 0 and hits == len(again) == len(programs)


def test_auto_takes_the_measured_stacking_for_the_device_kind():
    kind = jax.devices()[0].device_kind
    table = [{"device_kind": "some other chip", "arch": "mlp", "strategy": "unroll", "source": "x"},
             {"device_kind": kind, "arch": "mlp", "min_members": 3, "strategy": "map", "chunk": 2, "source": "run y"},
             {"device_kind": kind, "arch": "mlp", "strategy": "unroll", "source": "run z"}]
    cfg = C.override(C.preset("vec_tiny"), ["seeds=[0,1,2,3]"])
    dev = jax.devices()[:1]
    four, two = stack.build(cfg, dev, strategy="vmap"), stack.build(C.override(cfg, ["seeds=[0,1]"]), dev, strategy="vmap")
    assert plan.first_choice(four, table)[:2] == ("map", 2)  # 4 members per device: the first match
    assert plan.first_choice(two, table)[0] == "unroll"  # 2 members: below the first entry's range
    strategy, _, _, why = plan.first_choice(four, table[:1])
    assert strategy == "vmap" and "not measured" in why  # nothing for this kind: the rule of thumb
    sw, why = plan.plan(four, table)  # what is tried first is what trains, when it fits
    assert (sw.strategy, sw.chunk) == ("map", 2) and "run y" in why
    shipped = plan.measured_choice("cpu", "unet", 4)  # the shipped table (jaxconcept/train/strategies.json)
    assert shipped["strategy"] == "unroll" and shipped["source"]
