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


def test_messages_go_through_the_jaxconcept_logger_and_quiet_leaves_them_out(capsys, caplog):
    """Progress lines are ``logging`` records of the ``jaxconcept`` logger: the command line prints them
    as one line on stderr, ``--quiet`` (before or after the command) leaves them out, and afterwards
    the logger is as it was (a program that calls ``main`` keeps its own logging). Warnings under
    ``--quiet``: tests/test_sd.py."""
    import logging

    log = logging.getLogger("jaxconcept")
    before = log.level, log.propagate, list(log.handlers)
    sweep = ["data", "--preset", "vec_tiny", "--set", "seeds=[0,1]", "--out", "/dev/null"]
    assert main(sweep) == 0
    assert capsys.readouterr().err == "jaxconcept: the config is a sweep; rendering its first member\n"
    for argv in (["--quiet", *sweep], [*sweep, "-q"]):
        assert main(argv) == 0
        assert capsys.readouterr().err == ""
    assert (log.level, log.propagate, log.handlers) == before
    with caplog.at_level(logging.INFO, logger="jaxconcept"):  # outside the command line: records, nothing printed
        logging.getLogger("jaxconcept.data").info("a message")
    assert [r.getMessage() for r in caplog.records] == ["a message"]
    assert capsys.readouterr().err == ""


def test_importing_the_library_changes_nothing_process_wide():
    """Importing the modules leaves logging, warnings and matplotlib's backend as they were (the
    backend set to svg here, so that a module choosing one would show)."""
    import os
    import subprocess
    import sys

    code = """
import logging, warnings, matplotlib
state = lambda: (logging.getLogger().level, logging.getLogger().handlers[:], logging.getLogger('jaxconcept').level,
                 logging.getLogger('jaxconcept').handlers[:], warnings.showwarning, warnings.formatwarning,
                 list(warnings.filters), matplotlib.rcParams['backend'])
before = state()
import jaxconcept.cli, jaxconcept.analysis.plots, jaxconcept.demo, jaxconcept.train.plan, jaxconcept.analysis.probe, \\
    jaxconcept.elicit.measure, jaxconcept.analysis.dynamics, jaxconcept.sd.command, jaxconcept.sd.weights, \\
    jaxconcept.data.celeba
assert state() == before, (before, state())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": "svg"})
    assert res.returncode == 0, res.stderr[-3000:]


def test_config_prints_the_resolved_config_and_its_members(capsys):
    import json

    from jaxconcept import config as C

    argv = ["config", "--preset", "vec_tiny", "--set", "seeds=[3,4]", "--set", "train.lr=0.002", "--members"]
    assert main(argv) == 0
    out = capsys.readouterr()
    cfg = C.from_dict(json.loads(out.out), C.preset("vec_tiny"))
    assert cfg == C.override(C.preset("vec_tiny"), ["seeds=[3,4]", "train.lr=0.002"]) and cfg.train.lr == 0.002
    lines = out.err.strip().splitlines()
    assert lines[0] == "jaxconcept: 2 member(s), sweeping seed" and len(lines) == 4 and '"seed": 4' in lines[3]
    assert lines[1] == "jaxconcept: training classes 0-0, 0-1, 1-0; held out 1-1"  # vectors' default, resolved
    assert main(["config", "--preset", "vec_tiny", "--set", "train.lr=-1"]) == 2  # a bad value: one line
    assert "train.lr" in capsys.readouterr().err


def test_the_demo_config_is_the_experiments_file():
    from jaxconcept import config as C

    cfg = demo.demo_config()
    assert cfg == C.load(demo.DEMO_CONFIG) and cfg.name == "demo" and len(C.members(cfg)) == 6
    assert demo.demo_config(["train.steps=10"]).train.steps == 10
