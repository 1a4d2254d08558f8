"""Every number trustworthy: honest elicitation, lossless results, processes that cannot disagree,
a memory plan that reads the right memory, runs with no held-out class, a probe that holds at the
corners of the class boxes, and one-line warnings."""
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import cli, data as D, rundir, runs
from jaxconcept.elicit import measure
from jaxconcept.train import loop, plan, stack
from jaxconcept.analysis import probe as P
from jaxconcept.train.step import member_keys
from jaxconcept import config as C

ROOT = str(Path(__file__).resolve().parent.parent)
ENV1 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
            PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
TINY = ["train.steps=4", "train.steps_per_call=2", "eval.steps=[2,4]", "data.n_per_class=16", "model.hidden=[16]",
        "eval.n_samples=8", "eval.sampler_steps=2"]


# --------------------------------------------------------------------------------------------
# Elicitation
# --------------------------------------------------------------------------------------------
def _blind_samplers(spec, p_right: float):
    """Samplers of a model whose accuracy is ``p_right`` whatever the prompt or strength: each
    sample sits at the held-out class's mean with that probability, else at class 0's."""
    means = np.asarray(D.prompts(spec, D.params(C.members(VEC)[0].data)))  # cond_mode "mean": the class means
    right, wrong = jnp.asarray(means[3]), jnp.asarray(means[0])
    pad = jnp.zeros((spec.x_shape[0] - right.shape[0],))

    def draw(key, shape):
        hit = jax.random.bernoulli(key, p_right, shape)[..., None]
        return jnp.concatenate([jnp.where(hit, right, wrong), jnp.broadcast_to(pad, (*shape, pad.shape[0]))], -1)

    plain = jax.jit(lambda params, conds, key: draw(key, (conds.shape[0],)))
    steered = jax.jit(lambda params, c_ref, c_held, alphas, key: draw(jax.random.fold_in(key, 9),
                                                                     (alphas.shape[0], VEC.eval.n_samples)))
    composed = jax.jit(lambda params, a, b, c, alphas, key: draw(jax.random.fold_in(key, 8),
                                                                 (alphas.shape[0], VEC.eval.n_samples)))
    return plain, steered, composed


VEC = C.override(C.preset("vec2x2"), ["data.cond_mode=\"mean\"", "eval.n_samples=32"])


@pytest.mark.parametrize("n_strengths", [2, 16])
def test_a_model_equally_good_at_every_strength_is_reported_at_that_accuracy(n_strengths):
    member = C.members(VEC)[0]
    spec = D.spec(member.data)
    probe = P.probe_for(member.data)
    st = measure.setting(VEC, member, probe, samplers=_blind_samplers(spec, 0.5), over=tuple(range(n_strengths)))
    latent = tuple(range(n_strengths))
    recs = [measure.elicit_step(st, None, jax.random.fold_in(jax.random.PRNGKey(1), s), latent, latent)
            for s in range(150)]
    for kind in ("naive", "over", "latent", "latent_comp"):
        mean = np.mean([r[kind] for r in recs])
        assert abs(mean - 0.5) < 0.03, (kind, n_strengths, mean)  # SE of the mean: 0.5 / sqrt(32 * 150) = 0.007
    # what the old estimate (the best strength scored on the samples that chose it) would say
    best_of_same = np.mean([max(r["over_each"]) for r in recs])
    assert best_of_same > 0.5 + (0.03 if n_strengths == 2 else 0.12), best_of_same
    # the reference's statistic is that biased kind: the best prompt on the samples that chose it
    assert np.mean([r["reference_biased"] for r in recs]) > 0.5 + (0.03 if n_strengths == 2 else 0.12)


def test_elicitation_draws_from_its_own_stream_one_checkpoint_at_a_time(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = C.override(C.preset("vec_tiny"), TINY + ["train.steps=3", "train.steps_per_call=1", "eval.steps=[0,1,2,3]"])
    loop.train(cfg, run, progress=False)
    events, keys = [], []
    load, step_fn = runs.Run.params, measure.elicit_step
    monkeypatch.setattr(runs.Run, "params", lambda run, s, g=None: (events.append(("load", s)), load(run, s, g))[1])

    def spy(st, params, key, *a):
        events.append(("elicit", len(events)))
        keys.append(np.asarray(key))
        return step_fn(st, params, key, *a)
    monkeypatch.setattr(measure, "elicit_step", spy)
    out = measure.elicit_run(run, progress=False)
    assert out["steps"] == [0, 1, 2, 3]
    assert [e[0] for e in events] == ["load", "elicit"] * 4  # every checkpoint read, used, then the next
    streams = {tuple(np.asarray(k).ravel()) for k in member_keys(0).values()}
    streams |= {tuple(np.asarray(jax.random.fold_in(member_keys(0)["sample"], s)).ravel()) for s in range(4)}
    for k in keys:
        for sub in (0, 1):  # the selection and the reporting samples
            assert tuple(np.asarray(jax.random.fold_in(k, sub)).ravel()) not in streams
        assert tuple(k.ravel()) not in streams
    assert len({tuple(k.ravel()) for k in keys}) == 4
    m = out["members"][0]
    assert len(m["chosen_strength"]["over"]) == 4 and len(m["per_strength"]["over"]) == len(measure.OVER_STRENGTHS)
    monkeypatch.setattr(measure, "elicit_step", step_fn)
    thin = measure.elicit_run(run, progress=False, write=False, every=2)  # every other checkpoint, and the last
    assert thin["steps"] == [0, 2, 3]
    assert thin["members"][0]["accuracy"]["naive"] == [m["accuracy"]["naive"][i] for i in (0, 2, 3)]


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------
def test_samples_are_stored_as_computed_and_float16_only_where_harmless(tmp_path):
    cfg = C.override(C.preset("vec2x2"), ["data.normalize=false", "data.m=[300,300]", "data.s=[0.05,0.05]"])
    m = C.members(cfg)[0].data
    spec, params = D.spec(m), D.params(m)
    x, _, y = D.render_all(spec, params, jax.random.PRNGKey(0), 256)
    x = np.asarray(x)
    samples = x.reshape(1, spec.n_classes, 256, -1)
    prompts = np.zeros((1, spec.n_classes, 256, spec.cond_dim), np.float32)
    rundir.save_samples(tmp_path / "a", 1, samples, prompts)
    back = rundir.load_samples(tmp_path / "a", 1)["samples"]
    np.testing.assert_array_equal(back, samples)  # G's own samples come back bit for bit
    probe = P.probe_for(m, band=3)
    table = P.class_value_table(spec)[np.asarray(y)]
    assert P.correct(probe, back.reshape(-1, x.shape[-1]), table).all(-1).mean() == \
        P.correct(probe, x, table).all(-1).mean()
    tol = D.storage_tolerance(spec, params)
    with pytest.warns(rundir.RunWarning, match="float16' refused at step 1"):
        assert rundir.save_samples(tmp_path / "b", 1, samples, prompts, "float16", tol) == "float32"
    np.testing.assert_array_equal(rundir.load_samples(tmp_path / "b", 1)["samples"], samples)
    small = np.clip(samples / 300, 0, 1) * 0.05  # values whose float16 rounding is far below the tolerance
    assert rundir.save_samples(tmp_path / "c", 1, small, prompts, "float16", tol) == "float16"
    with np.load(tmp_path / "c" / "samples" / "step_0000001.npz") as f:
        assert f["samples"].dtype == np.float16 and 0 < float(f["rounding_error"]) <= tol


# --------------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(out, *more):
    sets = [a for s in TINY for a in ("--set", s)]
    return [sys.executable, "-m", "jaxconcept", "train", "--preset", "vec_tiny", "--no-progress", *sets, *more,
            "--out", str(out)]


def test_processes_with_different_configs_all_refuse_before_writing(tmp_path):
    port, out = _free_port(), tmp_path / "run"
    lrs = ["1e-3", "3e-4"]
    procs = [subprocess.Popen(_train_cmd(out, "--set", f"train.lr={lrs[i]}", "--coordinator", f"127.0.0.1:{port}",
                                         "--num-processes", "2", "--process-id", str(i)),
                              env=ENV1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    for _, err in outs:
        line = [ln for ln in err.splitlines() if "disagree" in ln]
        assert len(line) == 1 and "train.lr 0.001 vs 0.0003" in line[0], err[-2000:]
    assert not out.exists()  # nothing written


def test_a_peer_that_never_joins_ends_in_a_message_within_the_timeout(tmp_path):
    t0 = time.time()
    run = subprocess.run(_train_cmd(tmp_path / "run", "--coordinator", f"127.0.0.1:{_free_port()}",
                                    "--num-processes", "2", "--process-id", "0", "--join-timeout", "3"),
                         env=ENV1, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and time.time() - t0 < 60, run.stderr[-2000:]
    assert "not every process joined within 3 s" in run.stderr
    assert "Check failure" not in run.stderr  # our message, not JAX's abort


def test_open_mpi_launch_with_a_coordinator_override_detects_the_rest(tmp_path):
    """Under mpirun, JAX reads the process count and rank from Open MPI's environment; a
    JAX_COORDINATOR_ADDRESS override must not make `--distributed` ask for the other two."""
    port, out = _free_port(), tmp_path / "run"
    procs = []
    for i in range(2):
        env = dict(ENV1, OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://127.0.0.1:34911", OMPI_COMM_WORLD_SIZE="2",
                   OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_LOCAL_RANK="0",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
        procs.append(subprocess.Popen(_train_cmd(out, "--distributed"), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert rundir.steps_with(out) == [2, 4]


# --------------------------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------------------------
def _fake_host(root: Path, free_kb: int, avail_kb: int, cgroup=None):
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(f"MemTotal: 24000000 kB\nMemFree: {free_kb} kB\n"
                                           f"MemAvailable: {avail_kb} kB\nCached: 17000000 kB\n")
    if cgroup:
        cg = root / "sys" / "fs" / "cgroup"
        cg.mkdir(parents=True)
        limit, current, inactive = cgroup
        (cg / "memory.max").write_text(f"{limit}\n")
        (cg / "memory.current").write_text(f"{current}\n")
        (cg / "memory.stat").write_text(f"anon 100\ninactive_file {inactive}\nactive_file 5\n")


def test_host_memory_is_what_the_kernel_calls_available_within_a_cgroup_limit(tmp_path):
    _fake_host(tmp_path / "a", free_kb=4_500_000, avail_kb=23_000_000)
    got, source = plan.host_available_memory(str(tmp_path / "a"))
    assert got == 23_000_000 * 1024 and "MemAvailable" in source  # not MemFree (4.3 GiB)
    _fake_host(tmp_path / "b", 4_500_000, 23_000_000, cgroup=(8 << 30, 6 << 30, 3 << 30))
    got, source = plan.host_available_memory(str(tmp_path / "b"))
    assert got == (8 << 30) - ((6 << 30) - (3 << 30)) and "cgroup" in source  # page cache is reclaimable there too
    _fake_host(tmp_path / "c", 4_500_000, 23_000_000, cgroup=("max", 1, 0))
    assert plan.host_available_memory(str(tmp_path / "c"))[0] == 23_000_000 * 1024


def test_auto_compiles_the_step_it_measured_once(monkeypatch):
    from jax import monitoring

    lowered = []
    monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: lowered.append(1) if "jaxpr_to_mlir_module" in event else None)
    cfg = C.override(C.preset("vec_tiny"), TINY + ["seeds=[0,1,2,3]"])
    dev = jax.devices()[:1]

    def run(strategy, budget):
        n0 = len(lowered)  # before build: "auto" plans (and compiles what it measures) there
        sw = plan.build(C.override(cfg, [f'train.strategy="{strategy}"', f"train.memory_budget={budget}"]), dev)
        state, data = stack.init(sw)
        for _ in range(2):
            state, loss = stack.advance(sw, state, data, 2)
        jax.block_until_ready(loss)
        return len(lowered) - n0, sw

    run("vmap", 0)  # warm every small helper program
    explicit, _ = run("vmap", 0)
    planned, sw = run("auto", 1e12)
    assert sw.strategy == "vmap" and planned == explicit, (planned, explicit)


def test_a_step_that_does_not_fit_names_each_plan_and_what_to_set():
    cfg = C.override(C.preset("vec_tiny"), TINY + ["seeds=[0,1,2,3]", "train.memory_budget=1000"])
    with pytest.raises(loop.RunError) as err:
        plan.build(cfg, jax.devices()[:1])
    msg = str(err.value)
    assert "4 member(s) per device" in msg and "vmap of 4 members" in msg and "train.memory_budget" in msg
    assert "one member's training step" not in msg


# --------------------------------------------------------------------------------------------
# A run with every class trained
# --------------------------------------------------------------------------------------------
def test_a_run_with_no_held_out_class_trains_and_analyses_and_elicit_says_why_not(tmp_path, capsys):
    run = tmp_path / "run"
    args = [a for s in TINY for a in ("--set", s)]
    assert cli.main(["train", "--preset", "vec_tiny", "--no-progress", *args, "--set", "data.train_classes=[0,1,2,3]",
                     "--out", str(run)]) == 0
    assert cli.main(["analyze", str(run)]) == 0
    a = json.loads((run / "analysis.json").read_text())
    assert a["held_out"] == [] and len(a["steps"]) == 2
    capsys.readouterr()
    assert cli.main(["elicit", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no class out" in err[0]


# --------------------------------------------------------------------------------------------
# The probe at the corners of the class boxes
# --------------------------------------------------------------------------------------------
def test_image_probe_meets_its_bar_at_the_corners_of_the_class_boxes(monkeypatch, probe_cache):
    monkeypatch.setenv("JAXCONCEPT_CACHE", str(probe_cache))
    m = C.members(C.preset("tiny"))[0].data
    spec, params = D.spec(m), D.params(m)
    probe = P.probe_for(m)
    assert probe.corner_accuracy is not None and probe.corner_accuracy.min() >= 0.99
    labels = np.repeat(np.arange(spec.n_classes), 256)  # fresh corner draws, not the probe's own test set
    x, _ = D.corner_sample(spec, params, jax.random.PRNGKey(123), jnp.asarray(labels))
    ok = P.correct(probe, np.asarray(x), P.class_value_table(spec)[labels])
    assert P.per_class_accuracy(ok, labels, spec.n_classes).min() >= 0.97


# --------------------------------------------------------------------------------------------
# Smaller things
# --------------------------------------------------------------------------------------------
def test_a_run_whose_every_member_froze_leaks_no_numpy_warning(tmp_path, monkeypatch):
    cfg = C.override(C.preset("vec_tiny"), TINY + ["seeds=[0,1]"])
    real_init = stack.init_member

    def nan_lr(*a, **k):  # every member's learning rate NaN: each step is refused, every member frozen
        state = real_init(*a, **k)
        return state.replace(hyper={**state.hyper, "lr": jnp.float32(jnp.nan)})
    monkeypatch.setattr(stack, "init_member", nan_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", rundir.RunWarning)
        loop.train(cfg, tmp_path / "run", progress=False)
    assert all(all(r["frozen"]) for r in rundir.load_metrics(tmp_path / "run"))


def test_an_unreadable_checkpoint_is_one_line_on_the_command_line(tmp_path):
    run = tmp_path / "run"
    cmd = _train_cmd(run, "--set", "train.checkpoint_every=2")
    subprocess.run(cmd, env=ENV1, check=True, capture_output=True)
    for f in (run / "checkpoints" / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    again = subprocess.run(cmd, env=ENV1, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    hits = [i for i, ln in enumerate(lines) if "step 4 is unreadable" in ln]
    assert len(hits) == 1 and lines[hits[0]].startswith("jaxconcept: warning: "), lines
    assert not any("rundir.warn" in ln or "warnings.warn" in ln for ln in lines)
