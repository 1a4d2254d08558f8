"""analyze_run, the figures and `jaxconcept analyze` on fake run directories whose samples are
G's own renders of chosen classes, so the expected learning times and turns are known."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from jaxconcept.analysis import analyze, plots
from jaxconcept import cli, rundir
from jaxconcept import config as C
from jaxconcept import data as D

STEPS = [10 * (i + 1) for i in range(12)]
N_SAMPLES = 20


def _figures(a, run):
    return plots.all_figures(a, analyze.shown_samples(run, a), run / "figures")


def _held_out_mix(t: int, rest_end: int) -> np.ndarray:
    """Source-class proportions of the held-out class (3) at checkpoint t: centre -> class 1
    (memorised) -> rest until ``rest_end`` -> ramp to class 3 over 4 checkpoints (0.25 .. 1)."""
    uniform, c1, c3 = np.full(4, 0.25), np.eye(4)[1], np.eye(4)[3]
    if t <= 3:
        return (1 - t / 3) * uniform + t / 3 * c1
    if t <= rest_end:
        return c1
    f = min(1.0, (t - rest_end) / 4)
    return (1 - f) * c1 + f * c3


def make_fake_run(run_dir, cfg: C.Config, rest_ends) -> None:
    """A run directory in the rundir layout; training classes show themselves from the start,
    the held-out class follows ``_held_out_mix`` with a member-specific end of its rest."""
    run_dir.mkdir(parents=True, exist_ok=True)
    C.save(cfg, run_dir / "config.json")
    members = C.members(cfg)
    recs = [{"index": i, **C.sweep_settings(m), "signal": D.concept_signal(m.data)}
            for i, m in enumerate(members)]
    (run_dir / "members.json").write_text(json.dumps(recs))
    spec = D.spec(cfg.data)
    for t, step in enumerate(STEPS):
        samples, prompts = [], []
        for i, m in enumerate(members):
            p = D.params(m.data)
            x, _, _ = D.render_all(spec, p, jax.random.PRNGKey(100 * i + t), N_SAMPLES)
            x = np.asarray(x).reshape(spec.n_classes, N_SAMPLES, *spec.x_shape)
            per_class = []
            for c in range(spec.n_classes):
                mix = _held_out_mix(t, rest_ends[i]) if c == 3 else np.eye(4)[c]
                counts = np.round(mix * N_SAMPLES).astype(int)
                counts[np.argmax(counts)] += N_SAMPLES - counts.sum()
                src = np.repeat(np.arange(4), counts)  # which class each sample is drawn from
                per_class.append(x[src, np.arange(N_SAMPLES)])
            samples.append(np.stack(per_class))
            prompts.append(np.asarray(D.prompts(spec, p)))
        rundir.save_samples(run_dir, step, np.stack(samples), np.stack(prompts))


def _vec_cfg():
    return C.override(C.preset("vec_tiny"), ["data.m=[[1.0,1.0],[1.0,2.0]]", "seeds=[0,1]"])


def _check_analysis(a, cfg, rest_ends, tol_steps):
    members = C.members(cfg)
    assert a["steps"] == STEPS and len(a["members"]) == len(members)
    held = a["class_names"][3]
    dim0 = a["concepts"][0]
    for i, m in enumerate(a["members"]):
        r = rest_ends[i]
        # held-out: the first concept's accuracy is the class-3 share, 0.25 .. 1 from checkpoint r+1;
        # 0.8 is first crossed 1/5 of the way from checkpoint r+3 (0.75) to r+4 (1.0)
        first = m["learning_time_first_crossing"]
        assert first[held][dim0] == pytest.approx(STEPS[r + 3] + 0.2 * 10, abs=tol_steps)
        # the reference's measure, smoothed over checkpoints, is later, on the checkpoint grid, and
        # never when the ramp ends too close to the last checkpoint (its window may not leave the run)
        t = m["learning_time"][held][dim0]
        assert (t in STEPS and t > first[held][dim0]) if r + 6 < len(STEPS) - 1 else t is None, (r, t)
        for c in (0, 1, 2):  # training classes are right from the first checkpoint; the reference's
            # window of three needs a checkpoint before, so its T is the second checkpoint
            assert first[a["class_names"][c]]["joint"] == STEPS[0]
            assert m["learning_time"][a["class_names"][c]]["joint"] == STEPS[1]
        assert m["saturation"] == STEPS[0] and m["path"][held]["memorise_then_generalise"]
        t = m["turn"][held]
        assert t["turned"] and t["nearest"] == a["class_names"][1]
        assert abs(t["index"] - r) <= 1
        assert len(m["accuracy"][held]["joint"]) == len(STEPS)
        assert np.asarray(m["coords"][held]).shape == (len(STEPS), len(a["concepts"]))
        # the trajectory ends at the held-out corner (1, 1), passing by corner (0, 1)
        assert np.allclose(m["coords"][held][-1], [1, 1], atol=0.1)
    rows = a["summary"][held][dim0]
    learned = sum(m["learning_time"][held][dim0] is not None for m in a["members"])
    assert sum(r["n"] for r in rows) == len(members) and sum(r["n_learned"] for r in rows) == learned


def _check_figures(paths):
    names = {p.name for p in paths}
    assert names == {"trajectories.png", "accuracy.png", "learning_times.png", "trajectories.gif"}
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 100 and im.size[1] > 100
            if p.suffix == ".gif":
                assert getattr(im, "n_frames", 1) == len(STEPS)


def test_analyze_vector_run(tmp_path):
    cfg, rest_ends = _vec_cfg(), [4, 6, 5, 7]
    make_fake_run(tmp_path / "run", cfg, rest_ends)
    a = analyze.analyze_run(tmp_path / "run")
    _check_analysis(a, cfg, rest_ends, tol_steps=2.0)
    on_disk = json.loads((tmp_path / "run" / "analysis.json").read_text())
    assert on_disk["members"][1]["learning_time"] == a["members"][1]["learning_time"]
    _check_figures(_figures(a, tmp_path / "run"))


def test_analyze_image_run(tmp_path, monkeypatch, probe_cache):
    monkeypatch.setenv("JAXCONCEPT_CACHE", str(probe_cache))
    cfg, rest_ends = C.preset("tiny"), [5]
    make_fake_run(tmp_path / "run", cfg, rest_ends)
    a = analyze.analyze_run(tmp_path / "run")
    _check_analysis(a, cfg, rest_ends, tol_steps=0.5)
    _check_figures(_figures(a, tmp_path / "run"))


def test_cli_analyze(tmp_path, capsys):
    cfg = C.override(C.preset("vec_tiny"), [])
    make_fake_run(tmp_path / "run", cfg, [5])
    assert cli.main(["analyze", str(tmp_path / "run"), "--threshold", "0.7"]) == 0
    a = json.loads((tmp_path / "run" / "analysis.json").read_text())
    assert a["threshold"] == 0.7 and (tmp_path / "run" / "figures" / "trajectories.gif").exists()
    out = capsys.readouterr().out
    assert "turn at step" in out and "claim 2 |" in out and "sigma 1.5 checkpoints" in out
    assert cli.main(["analyze", str(tmp_path / "run"), "--measure", "first-crossing"]) == 0
    a = json.loads((tmp_path / "run" / "analysis.json").read_text())
    assert a["measure"] == "first_crossing" and a["threshold"] == 0.8 and "learning_time_reference" in a["members"][0]


def test_cli_analyze_refuses_non_runs(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    C.save(C.preset("vec_tiny"), tmp_path / "config.json")
    assert cli.main(["analyze", str(tmp_path)]) == 2
    assert "no samples" in capsys.readouterr().err


def test_end_to_end_tiny_vector_run(tmp_path):
    """A real (20-step) training run, then the analysis: well-formed, whatever the model learned."""
    from jaxconcept.train import loop

    cfg = C.preset("vec_tiny")
    loop.train(cfg, tmp_path / "run", progress=False)
    a = analyze.analyze_run(tmp_path / "run")
    steps = rundir.steps_with(tmp_path / "run")
    assert a["steps"] == steps and len(a["members"]) == 1
    m = a["members"][0]
    for name in a["class_names"]:
        acc = np.asarray(m["accuracy"][name]["joint"])
        assert acc.shape == (len(steps),) and np.all((acc >= 0) & (acc <= 1))
        assert np.all(np.isfinite(m["coords"][name]))
    assert set(m["turn"]) == {a["class_names"][c] for c in a["held_out"]}
    _check_figures_names(_figures(a, tmp_path / "run"))


def _check_figures_names(paths):
    assert {p.name for p in paths} == {"trajectories.png", "accuracy.png", "learning_times.png", "trajectories.gif"}
    for p in paths:
        with Image.open(p) as im:
            im.verify()
