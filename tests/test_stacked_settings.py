"""Per-member settings in one stack and sweeps of several groups (issue 35): a member trained in a
mixed stack gives the numbers it gives alone, bit for bit (one member per device: tests/conftest.py
forces 8 CPU devices); traced dropout, warmup and older checkpoints; a run of two groups trained,
resumed, analysed and elicited as one run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconcept.train import checkpoint, loop, plan, stack
from jaxconcept.analysis import analyze
from jaxconcept import config as C, runs, nets, rundir
from jaxconcept.cli import main
from jaxconcept.data import spec as data_spec
from jaxconcept.train.step import Layout, TrainState, adamw, hyper_values

SHORT = ["train.steps=4", "train.steps_per_call=4", "train.checkpoint_every=4", "eval.steps=[4]", "data.n_per_class=16"]


def _numbers(run_dir, rows=None) -> dict:
    """The numbers a run wrote (metrics less timing, samples, parameters) of its members ``rows``."""
    out = {}
    for r in rundir.load_metrics(run_dir):
        for k in ("train_loss", "val_loss", "test_loss"):
            out[f"{r['step']}/{k}"] = np.asarray(r[k])[rows]
    for sub in ("samples", "params"):
        for p in sorted((run_dir / sub).glob("step_*.npz")):
            with np.load(p) as f:
                out.update({f"{sub}/{p.stem}/{k}": f[k][rows] for k in f.files if k != "step"})
    return out


def _same_bits(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_eight_members_of_lr_weight_decay_and_seed_in_one_stack_equal_each_alone(tmp_path):
    cfg = C.override(C.preset("vec_tiny"), SHORT + ["train.lr=[1e-3,3e-3]", "train.weight_decay=[0,0.05]",
                                                    "seeds=[0,1]"])
    sw, _ = loop.train(cfg, tmp_path / "stack", progress=False)
    assert sw.size == 8 and len(C.groups(cfg)) == 1 and not (tmp_path / "stack" / "groups").exists()  # one stack
    ms = C.members(cfg)
    assert len({json.dumps(C.member_values(cfg, m)) for m in ms}) == 8
    stacked = [_numbers(tmp_path / "stack", [i]) for i in range(8)]
    assert not np.array_equal(stacked[0]["params/step_0000004/['net']['dense_out']['kernel']"],
                              stacked[2]["params/step_0000004/['net']['dense_out']['kernel']"])  # weight decay acts
    for i, m in enumerate(ms):
        loop.train(m, tmp_path / f"alone{i}", progress=False)
        _same_bits(stacked[i], _numbers(tmp_path / f"alone{i}", [0]))


def _run(cfg, steps, devices=None):
    sw = plan.build(cfg, devices)
    state, data = stack.init(sw)
    state, _ = stack.advance(sw, state, data, steps)
    samples, _, val, test = stack.evaluate(sw, state, data, steps)
    return sw, {"params": np.asarray(state.params), "ema": None if state.ema is None else np.asarray(state.ema),
                "samples": np.asarray(samples), "val": np.asarray(val), "test": np.asarray(test)}


def test_every_per_member_setting_in_one_stack_gives_each_members_numbers_alone():
    """Two members differing in every per-member setting at once (a zipped axis): the stack has
    moving averages, warmup, conditioning dropout and guidance for both; the first member alone has
    none of them, yet its numbers are the same bits (decay 0, warmup 0, p 0 and weight 1 select the
    plain numbers)."""
    fields = {"train.lr": [1e-3, 3e-3], "train.weight_decay": [0.01, 0], "train.grad_clip": [0.01, 1],
              "train.ema": [0, 0.5], "train.warmup": [0, 3], "train.p_cfg": [0, 0.3], "model.init_scale": [1, 0.5],
              "model.gamma_min": [-5, -6], "model.gamma_max": [10, 9], "eval.w_cfg": [1, 2],
              "data.cond_noise": [0, 0.05]}
    cfg = C.override(C.preset("vec_tiny"), ["data.cond_mode=\"observed\"", "data.n_per_class=16",
                                            "train.steps_per_call=4", f"sweep.zip=[{json.dumps(list(fields))}]"]
                     + [f"{k}={json.dumps(v)}" for k, v in fields.items()])
    ms = C.members(cfg)
    assert len(ms) == 2 and len(C.groups(cfg)) == 1
    sw, both = _run(cfg, 4)
    assert sw.active.ema and sw.active.p_cfg and sw.active.guidance
    assert not np.allclose(both["samples"][0], both["samples"][1])
    for i, m in enumerate(ms):
        alone_sw, alone = _run(m, 4)
        assert alone_sw.active.ema == alone_sw.active.guidance == (i == 1)
        for k in ("params", "samples", "val", "test"):
            np.testing.assert_array_equal(both[k][i], alone[k][0], err_msg=f"member {i}: {k}")
    np.testing.assert_array_equal(both["ema"][0], both["params"][0])  # decay 0: the parameters themselves
    np.testing.assert_array_equal(both["ema"][1], alone["ema"][0])


@pytest.mark.parametrize("impl", ["xla", "explicit"])
def test_a_traced_dropout_rate_draws_the_masks_of_the_fixed_rate(impl):
    import flax.linen as nn

    from jaxconcept.nets.layers import dropout

    class Drop(nn.Module):
        rate: object

        @nn.compact
        def __call__(self, x):
            return dropout(x, self.rate, False, impl)

    x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 16))

    def out(x, rate):
        return Drop(rate).apply({}, x, rngs={"dropout": jax.random.PRNGKey(2)})
    fixed, traced = jax.jit(lambda x: out(x, 0.1))(x), jax.jit(out)(x, jnp.float32(0.1))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(fixed))
    assert 0.05 < float(jnp.mean(fixed == 0)) < 0.15
    np.testing.assert_array_equal(np.asarray(jax.jit(out)(x, jnp.float32(0.0))), np.asarray(x))  # rate 0: no dropout
    unet = nets.build(C.preset("tiny").model, data_spec(C.preset("tiny").data))
    assert nets.with_dropout(unet, 0.3).dropout == 0.3 and unet.dropout == 0.1


def test_warmup_is_optax_linear_schedule_and_zero_is_none():
    tree = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    layout = Layout.of(tree)

    def run(warmup, n=6):
        tc = C.TrainConfig(lr=0.01, weight_decay=0.05, grad_clip=1e3, warmup=warmup)
        hyper = {k: jnp.float32(v[0]) for k, v in hyper_values([C.Config(train=tc)]).items()}
        flat = layout.ravel(tree)
        state = TrainState(params=flat, mu=jnp.zeros_like(flat), nu=jnp.zeros_like(flat), ema=None,
                           step=jnp.int32(0), key=jax.random.PRNGKey(1), alive=jnp.bool_(True), hyper=hyper)
        grads = [jax.random.normal(jax.random.PRNGKey(i), flat.shape) for i in range(n)]
        for g in grads:
            state = jax.jit(adamw)(state, g, jnp.float32(1.0))
        return np.asarray(state.params), grads

    got, grads = run(4)
    lr = optax.linear_schedule(0.01 / 4, 0.01, 3)  # count 0 .. 3: lr (1 .. 4) / 4, then lr
    tx = optax.adamw(lr, weight_decay=0.05)
    ref, opt = layout.ravel(tree), None
    opt = tx.init(ref)
    for g in grads:
        upd, opt = tx.update(g, opt, ref)
        ref = optax.apply_updates(ref, upd)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-7)
    plain, _ = run(0)
    np.testing.assert_array_equal(plain, run(0)[0])
    ref0 = layout.ravel(tree)
    tx0 = optax.adamw(0.01, weight_decay=0.05)
    opt0 = tx0.init(ref0)
    for g in grads:
        upd, opt0 = tx0.update(g, opt0, ref0)
        ref0 = optax.apply_updates(ref0, upd)
    np.testing.assert_allclose(plain, np.asarray(ref0), rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, plain)


def test_a_checkpoint_with_fewer_per_member_settings_restores(tmp_path):
    like = TrainState(params=jnp.ones((2, 3)), mu=jnp.zeros((2, 3)), nu=jnp.zeros((2, 3)), ema=None,
                      step=jnp.full(2, 7, jnp.int32), key=jnp.zeros((2, 2), jnp.uint32), alive=jnp.ones(2, bool),
                      hyper={k: jnp.full(2, 0.5) for k in ("lr", "weight_decay", "grad_clip", "ema", "w_cfg")})
    old = like.replace(params=like.params * 3, hyper={k: like.hyper[k] for k in ("lr", "weight_decay")})
    mngr = checkpoint.manager(tmp_path / "ck", 2)
    checkpoint.save(mngr, 7, old)
    mngr.close()
    assert checkpoint.latest_step(tmp_path / "ck") == 7 and checkpoint.latest_step(tmp_path / "none") == -1
    _, step, state = checkpoint.restore_latest(tmp_path / "ck", 2, like)
    assert step == 7 and sorted(state.hyper) == ["lr", "weight_decay"]
    np.testing.assert_array_equal(np.asarray(state.params), 3.0)


def test_two_groups_train_resume_and_read_as_one_run(tmp_path, capsys):
    """model.hidden = [32] or [64] (two programs) x two seeds: two groups in one run directory."""
    run = tmp_path / "run"
    sets = ["model.hidden=[[32],[64]]", "seeds=[0,1]", "train.steps=4", "train.steps_per_call=2",
            "train.checkpoint_every=2", "eval.steps=[2,4]", "data.n_per_class=16", "eval.sampler_steps=4"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", "--preset", "vec_tiny", "--no-progress", *args, "--out", str(run)]) == 0
    assert "4 member(s) (sweeping model.hidden, seed) in 2 groups" in capsys.readouterr().out
    members = json.loads((run / "members.json").read_text())
    assert [(m["group"], m["values"]) for m in members] == [
        (0, {"model.hidden": [32], "seed": 0}), (0, {"model.hidden": [32], "seed": 1}),
        (1, {"model.hidden": [64], "seed": 0}), (1, {"model.hidden": [64], "seed": 1})]
    parts = runs.of_run(run)
    assert [(p.dir, p.members) for p in parts] == [(run / "groups" / "0", (0, 1)), (run / "groups" / "1", (2, 3))]
    assert not (run / "samples").exists() and runs.steps_with(run, "params") == [2, 4]
    # group 1 is the run its members make alone
    cfg = C.override(C.preset("vec_tiny"), sets[1:] + ["model.hidden=[64]"])
    loop.train(cfg, tmp_path / "alone", progress=False)
    _same_bits(_numbers(run / "groups" / "1", [0, 1]), _numbers(tmp_path / "alone", [0, 1]))
    merged = runs.load_metrics(run)
    assert [r["step"] for r in merged] == [2, 4] and len(merged[-1]["val_loss"]) == 4
    assert merged[-1]["val_loss"][2:] == rundir.load_metrics(tmp_path / "alone")[-1]["val_loss"]
    # the same command again: the finished group 0 is not built again
    before = (run / "groups" / "0" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--preset", "vec_tiny", "--no-progress", *args, "--out", str(run)]) == 0
    said = capsys.readouterr().err
    assert "group 1 of 2" not in said and "jaxconcept: group 2 of 2: 2 member(s), model.hidden=[64]" in said
    assert (run / "groups" / "0" / "metrics.jsonl").read_text() == before
    # analyze and elicit read the two groups as one run
    assert main(["analyze", str(run), "--by", "seed", "--colour", "model.hidden"]) == 0
    assert main(["analyze", str(run), "--by", "train.lr"]) == 2
    assert "--by='train.lr': not a swept field of this run; allowed model.hidden, seed" in capsys.readouterr().err
    a = json.loads((run / "analysis.json").read_text())
    assert a["groups"] == 2 and a["swept"] == ["model.hidden", "seed"] and len(a["members"]) == 4
    assert [m["group"] for m in a["members"]] == [0, 0, 1, 1] and (run / "figures" / "sweep.png").stat().st_size > 1000
    alone = json.loads(json.dumps(analyze.analyze_run(tmp_path / "alone", write=False)["members"]))
    for mine, theirs in zip(a["members"][2:], alone):
        assert mine["coords"] == theirs["coords"] and mine["accuracy"] == theirs["accuracy"]
    assert main(["elicit", str(run)]) == 0
    e = json.loads((run / "elicit.json").read_text())
    assert [m["group"] for m in e["members"]] == [0, 0, 1, 1] and e["steps"] == [2, 4]
    assert all(len(m["accuracy"]["naive"]) == 2 for m in e["members"])
