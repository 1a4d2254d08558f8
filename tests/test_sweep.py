"""The sweep engine: stacking, sharding, resume, divergence, run-dir checks."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import config as C, rundir, runs
from jaxconcept.train import loop, plan, programs, stack
from jaxconcept.train.step import draw_batch, eval_loss

VEC = ["train.steps=12", "train.steps_per_call=4", "train.checkpoint_every=8", "eval.steps=[4,12]",
       "data.n_per_class=16"]


def _leaves_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _run_steps(cfg, n, devices=None):
    sw = plan.build(cfg, devices)
    state, data = stack.init(sw)
    done = 0
    while done < n:
        k = min(sw.steps_per_call, n - done)
        state, _ = stack.advance(sw, state, data, k)
        done += k
    return sw, state, data


def test_sweep_of_three_equals_three_single_runs():
    base = C.override(C.preset("vec_tiny"), VEC)
    cfg = C.override(base, ["data.m=[[1,1],[1,2],[2,1]]", "seeds=[3]"])
    sw, state, data = _run_steps(cfg, 8)
    assert sw.size == 3
    for i, m in enumerate(C.members(cfg)):
        _, single, single_data = _run_steps(m, 8)
        _leaves_close(jax.tree.map(lambda a: a[i], data), jax.tree.map(lambda a: a[0], single_data), rtol=0, atol=0)
        _leaves_close(state.params[i], single.params[0], rtol=1e-5, atol=1e-6)


def test_any_split_of_the_steps_is_one_program_and_the_same_bits():
    """A call of n <= K steps runs the one compiled training program (n is its argument): any
    split of the steps gives the same bits, no second program is compiled for a remainder, and
    the loop has no conditional (on XLA:GPU one costs a host sync a step)."""
    base = C.override(C.preset("vec_tiny"), VEC)
    states = {}
    for k, splits in ((5, [5, 5, 2, 1]), (1, [1] * 13), (13, [13])):
        sw = plan.build(C.override(base, [f"train.steps_per_call={k}"]))
        state, data = stack.init(sw)
        losses = []
        for n in splits:
            state, loss = stack.advance(sw, state, data, n)
            losses.append(n * np.asarray(loss))
        states[k] = (state, sum(losses) / 13)
        if k == 5:
            assert sorted(sw._compiled) == ["advance", "init"]  # one training program for 5, 5, 2 and 1 steps
            assert sw.jitted.advance._cache_size() == 0  # nothing compiled beside the ahead-of-time programs
            text = programs.lower(sw, "advance").as_text()
            assert "stablehlo.while" in text and "stablehlo.case" not in text and "stablehlo.if" not in text
            with pytest.raises(ValueError, match=r"n=6 is invalid: allowed an integer in 1\.\.5"):
                stack.advance(sw, state, data, 6)  # more than one call's steps: refused, state untouched
    for k in (5, 13):
        _leaves_close(states[k][0], states[1][0], rtol=0, atol=0)
        np.testing.assert_allclose(states[k][1], states[1][1], rtol=1e-6)


def test_members_differ_in_data_and_seed():
    cfg = C.override(C.preset("vec_tiny"), VEC + ["data.m=[[1,1],[1,3]]", "seeds=[0,1]"])
    sw = plan.build(cfg)
    state, data = stack.init(sw)
    x = np.asarray(data["x_train"])
    assert x.shape[0] == 4
    assert not np.allclose(x[0], x[2])  # different m
    p = np.asarray(state.params)
    assert np.array_equal(p[0], p[2])  # init depends on the seed only
    assert not np.array_equal(p[0], p[1])


def test_ema_is_the_moving_average_and_is_what_gets_evaluated(tmp_path):
    cfg = C.override(C.preset("vec_tiny"), VEC + ["train.ema=0.5", "train.steps=8", "eval.steps=[8]"])
    sw = plan.build(cfg)
    state, data = stack.init(sw)
    _leaves_close(state.ema, state.params, rtol=0, atol=0)
    ema = np.asarray(state.ema)  # advance donates (deletes) its input state
    for _ in range(2):  # ema <- 0.5 ema + 0.5 params after every step
        state, _ = stack.advance(sw, state, data, 1)
        ema = 0.5 * ema + 0.5 * np.asarray(state.params)
    _leaves_close(state.ema, ema, rtol=1e-6, atol=1e-7)
    assert not np.allclose(state.ema, state.params)
    sw, final = loop.train(cfg, tmp_path, progress=False)
    saved = runs.Run(tmp_path).params(8)
    _leaves_close(saved, sw.layout.unravel(np.asarray(final.ema)), rtol=0, atol=0)
    with pytest.raises(C.ConfigError, match=r"train\.ema"):
        C.override(cfg, ["train.ema=1.0"])


def test_image_sweep_runs_and_evaluates(tmp_path):
    cfg = C.override(C.preset("tiny"), ["data.sep_col=[0.2,0.6]", "train.steps=6", "train.steps_per_call=3",
                                        "eval.steps=[3,6]", "data.n_per_class=8"])
    sw, state = loop.train(cfg, tmp_path / "run", progress=False)
    spec = sw.spec
    s = rundir.load_samples(tmp_path / "run", 6)
    assert s["samples"].shape == (2, spec.n_classes, cfg.eval.n_samples, *spec.x_shape)
    assert np.isfinite(s["samples"]).all()
    assert s["prompts"].shape == (2, spec.n_classes, cfg.eval.n_samples, spec.cond_dim)
    metrics = rundir.load_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics] == [3, 6] and all(len(r["val_loss"]) == 2 for r in metrics)
    assert all(len(r["test_loss"]) == 2 and np.isfinite(r["test_loss"]).all() for r in metrics)  # held-out loss
    # prompts: training classes drawn at random inside their boxes (as the reference), held-out at its mean
    from jaxconcept import data as D
    p = D.params(sw.members[1].data)
    pr = s["prompts"][1]  # [n_classes, n_samples, 11]
    lo, hi = np.asarray(p["lo"]) * spec.opt("cond_mask"), np.asarray(p["hi"]) * spec.opt("cond_mask")
    for c in spec.train_classes:
        assert np.all((pr[c] >= lo[c] - 1e-6) & (pr[c] <= hi[c] + 1e-6)) and np.ptp(pr[c][:, 4:8], axis=0).min() > 0
    np.testing.assert_allclose(pr[3], np.repeat(np.asarray(D.prompts(spec, p))[3:4], cfg.eval.n_samples, 0), atol=1e-6)
    mean_prompts = D.eval_prompts(spec, p, jax.random.PRNGKey(0), 4, "mean")
    np.testing.assert_allclose(mean_prompts[0], np.repeat(np.asarray(D.prompts(spec, p))[:1], 4, 0))
    members = json.loads((tmp_path / "run" / "members.json").read_text())
    assert [m["sep_col"] for m in members] == [0.2, 0.6]
    assert members[1]["signal"]["colour"] > members[0]["signal"]["colour"]
    params = runs.Run(tmp_path / "run").params(6)
    _leaves_close(params, sw.layout.unravel(np.asarray(state.params)), rtol=0, atol=0)


def test_one_and_eight_devices_agree():
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 CPU devices"
    cfg = C.override(C.preset("vec_tiny"), VEC + ["seeds=[0,1,2,3,4,5,6,7]"])
    sw1, s1, _ = _run_steps(cfg, 8, devices=jax.devices()[:1])
    sw8, s8, _ = _run_steps(cfg, 8)
    assert sw1.mesh.size == 1 and sw8.mesh.size == 8
    assert len(s8.params.sharding.device_set) == 8
    _leaves_close(s1.params, s8.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["map", "unroll"])
def test_strategies_match_vmap(strategy):
    cfg = C.override(C.preset("vec_tiny"), VEC + ["seeds=[0,1,2]"])
    _, a, _ = _run_steps(cfg, 4)
    _, b, _ = _run_steps(C.override(cfg, [f"train.strategy=\"{strategy}\""]), 4)
    _leaves_close(a.params, b.params, rtol=1e-5, atol=1e-6)


def test_diverging_member_is_frozen_others_carry_on():
    cfg = C.override(C.preset("vec_tiny"), VEC + ["seeds=[0,1,2]"])
    sw = plan.build(cfg)
    state, data = stack.init(sw)
    lr = np.asarray(state.hyper["lr"]).copy()
    lr[1] = np.nan
    state = state.replace(hyper={**state.hyper, "lr": stack.put(sw, lr)})
    before = np.asarray(state.params)
    state, loss = stack.advance(sw, state, data, 4)
    assert np.asarray(state.alive).tolist() == [True, False, True]
    after = np.asarray(state.params)
    assert np.isfinite(after).all()
    np.testing.assert_array_equal(before[1], after[1])  # frozen at its last good parameters
    assert not np.array_equal(before[0], after[0])


def test_changed_config_is_refused(tmp_path):
    cfg = C.override(C.preset("vec_tiny"), VEC + ["train.steps=4", "eval.steps=[4]"])
    loop.train(cfg, tmp_path, progress=False)
    with pytest.raises(loop.RunError, match=r"train\.lr"):
        loop.train(C.override(cfg, ["train.lr=0.01"]), tmp_path, progress=False)


@pytest.mark.parametrize("damage", ["garbage", "emptied"])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_finishes(tmp_path, damage):
    cfg = C.override(C.preset("vec_tiny"), VEC)
    loop.train(cfg, tmp_path, progress=False)
    final = dict(np.load(tmp_path / "params" / "step_0000012.npz"))
    latest = tmp_path / "checkpoints" / "12"
    for f in latest.rglob("*"):
        if f.is_file():
            if damage == "garbage":
                f.write_bytes(b"garbage")
            else:
                f.unlink()
    with pytest.warns(UserWarning, match="step 12 is unreadable") as record:
        loop.train(cfg, tmp_path, progress=False)  # falls back to step 8, trains 8 -> 12, saves 12 again
    assert len([w for w in record if "step 12" in str(w.message)]) == 1  # one line, not a storage dump
    assert (tmp_path / "checkpoints.bad" / "12").is_dir()  # kept for inspection
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [8, 12]
    again = np.load(tmp_path / "params" / "step_0000012.npz")
    for k in final:
        np.testing.assert_array_equal(final[k], again[k])
    assert [r["step"] for r in rundir.load_metrics(tmp_path)] == [4, 8, 12]


def test_epoch_batches_read_every_example_once_and_the_last_batch_is_short():
    tc = C.override(C.preset("vec_tiny"), ["train.batch_size=8"]).train
    n = 21  # 3 batches per epoch: 8, 8, 5
    data = {"x_train": jnp.arange(n, dtype=jnp.float32)[:, None], "c_train": jnp.zeros((n, 2))}
    key = jax.random.PRNGKey(0)
    seen, sizes = [], []
    for step in range(3):
        x, _, nv = draw_batch(tc, data, key, jnp.int32(step))
        sizes.append(int(nv))
        seen += np.asarray(x[: int(nv), 0]).astype(int).tolist()
    assert sizes == [8, 8, 5] and sorted(seen) == list(range(n))
    nxt = [np.asarray(draw_batch(tc, data, key, jnp.int32(s))[0][:, 0]) for s in (3, 4)]
    assert sorted(np.concatenate(nxt).astype(int).tolist()) != sorted(seen[:16])  # a new shuffle per epoch
    x, _, nv = draw_batch(C.override(C.preset("vec_tiny"), ['train.batches="replacement"']).train, data, key, 0)
    assert nv is None and x.shape == (32, 1)


def test_validation_loss_is_the_mean_of_batch_means_over_the_whole_set():
    from jaxconcept import data as D, vdm

    cfg = C.override(C.preset("vec_tiny"), VEC + ["train.batch_size=4"])
    sw = plan.build(cfg, jax.devices()[:1])
    state, data = stack.init(sw)
    params = sw.layout.unravel(state.params[0])
    x, c = data["x_val"][0], data["c_val"][0]  # 3 classes x 2 validation examples: batches of 4 + 2
    assert x.shape[0] == 6
    key = jax.random.PRNGKey(4)
    got = eval_loss(cfg, sw.spec, sw.apply_fn, params, x, c, key)
    kw = dict(train=False, null_cond=D.null_cond(sw.spec))
    first = vdm.loss_fn(sw.apply_fn, cfg.model, params, x[:4], c[:4], jax.random.fold_in(key, 0), **kw)[0]
    # the short last batch: 2 real rows, padded to 4 with rows that must not count (garbage here)
    xs, cs = jnp.concatenate([x[4:], 1e3 * jnp.ones_like(x[:2])]), jnp.concatenate([c[4:], c[:2]])
    last = vdm.loss_fn(sw.apply_fn, cfg.model, params, xs, cs, jax.random.fold_in(key, 1), n_valid=2, **kw)[0]
    np.testing.assert_allclose(got, (first + last) / 2, rtol=1e-5)
    with_4 = eval_loss(C.override(cfg, ["eval.val_batches=4"]), sw.spec, sw.apply_fn, params, x, c, key)
    assert np.isfinite(with_4) and not np.isclose(with_4, got)  # random batches are another estimate


def test_padding_keeps_every_device_and_changes_nothing():
    cfg = C.override(C.preset("vec_tiny"), VEC + ["seeds=[0,1,2,3,4]"])
    sw1, s1, _ = _run_steps(cfg, 4, devices=jax.devices()[:1])
    sw3, s3, _ = _run_steps(cfg, 4, devices=jax.devices()[:3])
    sw8, s8, _ = _run_steps(cfg, 4)
    assert (sw3.mesh.size, len(sw3.padded), sw8.mesh.size, len(sw8.padded)) == (3, 6, 5, 5)
    for s in (s3, s8):
        _leaves_close(s1.params, s.params[:5], rtol=1e-6, atol=1e-7)


def test_padded_run_writes_only_real_members_and_resumes_on_other_devices(tmp_path):
    cfg = C.override(C.preset("vec_tiny"), VEC + ["seeds=[0,1,2,3,4]"])
    loop.train(cfg, tmp_path, progress=False, devices=jax.devices()[:3], stop_after=8)  # padded to 6
    assert rundir.load_samples(tmp_path, 4)["samples"].shape[0] == 5
    _, state = loop.train(cfg, tmp_path, progress=False, devices=jax.devices()[:1])  # resumed unpadded
    full = tmp_path / "full"
    _, ref = loop.train(cfg, full, progress=False, devices=jax.devices()[:1])
    _leaves_close(state.params, ref.params, rtol=1e-6, atol=1e-7)


def test_auto_strategy_chunks_to_fit_a_memory_budget_and_matches_vmap():
    cfg = C.override(C.preset("vec_tiny"), VEC + ["seeds=[0,1,2,3,4,5,6,7]", "model.hidden=[128]",
                                                   # activations, not the stacked state, must dominate (as in a U-Net)
                                                   "train.batch_size=1024", "data.n_per_class=1024"])
    dev = jax.devices()[:1]
    need = plan.step_memory(plan.build(C.override(cfg, ['train.strategy="vmap"']), dev))
    chunk = {c: plan.step_memory(plan.build(C.override(cfg, ['train.strategy="map"', f"train.map_batch_size={c}"]),
                                               dev)) for c in (2, 4)}
    assert chunk[2] < chunk[4] < need
    budget = (chunk[2] + chunk[4]) / 2 / plan.HEADROOM  # vmap of 8 and chunks of 4 do not fit, chunks of 2 do
    auto = plan.build(C.override(cfg, [f"train.memory_budget={budget}"]), dev)
    assert auto.strategy == "map" and auto.chunk <= 2
    assert plan.step_memory(auto) <= plan.HEADROOM * budget
    _, a, _ = _run_steps(C.override(cfg, [f"train.memory_budget={budget}"]), 4, dev)
    _, b, _ = _run_steps(C.override(cfg, ['train.strategy="vmap"']), 4, dev)
    _leaves_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    with pytest.raises(loop.RunError, match="more than"):
        plan.build(C.override(cfg, ["train.memory_budget=1000"]), dev)


def test_the_cpu_choice_is_made_once_where_the_sweep_is_built():
    tiny = C.override(C.preset("tiny"), ['train.strategy="unroll"'])
    assert stack.build(tiny).loop_safe and stack.build(tiny).steps_per_call == 5  # explicit convs on CPU
    xla = stack.build(C.override(tiny, ['model.conv="xla"']))
    assert not xla.loop_safe and xla.steps_per_call == 1  # XLA's conv gradients are slow in loops on CPU
    with pytest.raises(ValueError, match="plan.build"):
        stack.build(C.preset("tiny"))  # "auto" is the plan's to resolve
