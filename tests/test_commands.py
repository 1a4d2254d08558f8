"""End-to-end runs of the commands not covered elsewhere: info and (a shrunk) demo."""
from PIL import Image

from jaxconcept import demo
from jaxconcept.cli import main


def test_info_prints_parameters_and_flops(capsys):
    assert main(["info", "--preset", "vec_tiny"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "GFLOP" in out


def test_demo_runs_end_to_end_when_shrunk(tmp_path):
    sets = ["train.steps=40", "train.steps_per_call=20", "eval.steps=[20,40]", "data.n_per_class=32",
            "model.hidden=[32]", "eval.n_samples=16", "eval.sampler_steps=5", "seeds=[0]"]
    figs = demo.run(tmp_path / "demo", progress=False, extra_sets=sets)["figures"]
    names = {f.split("/")[-1] for f in figs}
    assert {"elicit.png"} <= names and any(n.endswith(".gif") for n in names) and len(names) >= 4
    for f in figs:
        Image.open(f).verify()


def test_demo_command_takes_overrides_and_rejects_bad_ones(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "bad"), "--set", "train.ema=2"]) == 2
    assert "train.ema" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
