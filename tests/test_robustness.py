"""Nothing lost, nothing silently wrong: kills at every write point, damaged run files, concurrent
writers, multi-process training, and hostile inputs that must end in one clear message."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxconcept import cli, rundir
from jaxconcept.train import loop
from jaxconcept import config as C

SETS = ["train.steps=24", "train.steps_per_call=4", "train.checkpoint_every=8", "eval.steps=[8,16,24]",
        "data.n_per_class=16", "model.hidden=[32]", "seeds=[0,1]"]
OPT0 = "--xla_backend_optimization_level=0"  # tiny networks: compiling fast beats running fast
ROOT = str(Path(__file__).resolve().parent.parent)
# the killer script runs from a temporary directory: the package must import from this checkout
ENV1 = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {OPT0}", PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def _cmd(out, sets=SETS):
    args = [a for s in sets for a in ("--set", s)]
    return [sys.executable, "-m", "jaxconcept", "train", "--preset", "vec_tiny", "--no-progress", *args, "--out", str(out)]


def _same_run(a, b):
    assert rundir.steps_with(a) == rundir.steps_with(b) == [8, 16, 24]
    for step in (8, 16, 24):
        np.testing.assert_array_equal(rundir.load_samples(a, step)["samples"], rundir.load_samples(b, step)["samples"])
    pa, pb = np.load(a / "params" / "step_0000024.npz"), np.load(b / "params" / "step_0000024.npz")
    for k in pa.files:
        np.testing.assert_array_equal(pa[k], pb[k])
    ma, mb = rundir.load_metrics(a), rundir.load_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [8, 16, 24]
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]


# --------------------------------------------------------------------------------------------
# Kills at every write point
# --------------------------------------------------------------------------------------------
KILLER = textwrap.dedent('''
    """Run `jaxconcept train`, SIGKILLing itself at the N-th write of one kind (KILL_AT=kind:N)."""
    import contextlib, os, signal, sys
    from pathlib import Path
    from jaxconcept.train import checkpoint
    from jaxconcept import cli, rundir

    kind, n = os.environ["KILL_AT"].split(":")
    calls = {"n": 0}

    def hit():
        calls["n"] += 1
        if calls["n"] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)

    atomic = rundir.atomic

    @contextlib.contextmanager
    def killing_atomic(path, mode="w"):
        with atomic(path, mode) as f:
            yield f
            f.flush()
            mine = {"samples": "samples", "params": "params", "reconcile": "metrics.jsonl"}.get(kind)
            if mine and mine in str(path):
                hit()  # killed with the temporary file written and the final name untouched

    rundir.atomic = killing_atomic
    if kind == "metrics":
        def half_line(run_dir, record):
            line = rundir.json.dumps(record) + "\\n"
            with open(Path(run_dir) / "metrics.jsonl", "a") as f:
                f.write(line if calls["n"] + 1 < int(n) else line[: len(line) // 2])
                f.flush()
            hit()
        rundir.append_metrics = half_line
    if kind == "checkpoint":
        save = checkpoint.save

        def cut_short(mngr, step, state):
            save(mngr, step, state)
            if calls["n"] + 1 == int(n):  # as if the write had stopped before orbax committed it
                (Path(mngr.directory) / str(step) / "_CHECKPOINT_METADATA").unlink()
            hit()
        checkpoint.save = cut_short
    sys.exit(cli.main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run of SETS trained without interruption (one device): what every interrupted one must equal."""
    full = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_cmd(full), check=True, env=ENV1, capture_output=True)
    return full


def test_kills_at_each_write_point_leave_a_resumable_complete_run(tmp_path, uninterrupted):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    full, run = uninterrupted, tmp_path / "run"
    # each start resumes from the newest good checkpoint and dies at the next write of one kind (the
    # parameter files share the samples' writer, rundir.atomic)
    for point in ("samples:2", "metrics:2", "checkpoint:1", "reconcile:1"):
        cmd = [sys.executable, str(killer), *_cmd(run)[3:]]
        proc = subprocess.run(cmd, env=dict(ENV1, KILL_AT=point), capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        leftovers = list(run.rglob(".*.tmp"))
        assert leftovers or point in ("metrics:2", "checkpoint:1"), point  # the kill left a half-written file
    done = subprocess.run(_cmd(run), env=ENV1, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(full, run)
    assert (run / "checkpoints.bad").is_dir()  # the cut-short checkpoint was moved aside, not lost
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# Signals: SIGTERM (pre-emption) and Ctrl-C stop at a call boundary after a checkpoint
# --------------------------------------------------------------------------------------------
PAUSER = textwrap.dedent('''
    """Run `jaxconcept train`, pausing before its PAUSE_CALL-th compiled call until the test has
    sent its signal: the signal lands at a known point inside an interval between stops."""
    import os, sys, time
    from pathlib import Path
    from jaxconcept import cli
    from jaxconcept.train import stack

    advance, calls, marker = stack.advance, {"n": 0}, Path(os.environ["PAUSE_FILE"])

    def pausing(*a, **k):
        calls["n"] += 1
        if calls["n"] == int(os.environ["PAUSE_CALL"]):
            marker.write_text("paused")
            deadline = time.time() + 120
            while not marker.with_suffix(".sent").exists() and time.time() < deadline:
                time.sleep(0.01)  # the signal's handler runs here, in the main thread
        return advance(*a, **k)
    stack.advance = pausing
    sys.exit(cli.main(sys.argv[1:]))
''')


def _signalled(tmp, out, sig, pause_call, env=ENV1):
    """Train into ``out`` through PAUSER and send ``sig`` while it is paused; returns the process
    (finished) and its stderr."""
    pauser, marker = tmp / "pauser.py", tmp / f"pause_{sig.name}"
    pauser.write_text(PAUSER)
    proc = subprocess.Popen([sys.executable, str(pauser), *_cmd(out)[3:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(env, PAUSE_FILE=str(marker), PAUSE_CALL=str(pause_call)))
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    marker.with_suffix(".sent").write_text("")
    _, err = proc.communicate(timeout=240)
    return proc, err


def test_sigterm_and_ctrl_c_stop_after_a_checkpoint_and_resume_to_the_uninterrupted_run(tmp_path, uninterrupted):
    full, run = uninterrupted, tmp_path / "run"
    # steps_per_call 4, stops 8, 16, 24: paused before the call 8 -> 12, then (resumed at 12) 16 -> 20,
    # so each signal stops the run inside an interval, whose partial loss sum must carry over
    proc, err = _signalled(tmp_path, run, signal.SIGTERM, pause_call=3)
    assert proc.returncode == loop.EXIT_STOPPED, err[-3000:]
    assert err.strip().splitlines()[-1] == ("jaxconcept train: stopped by SIGTERM at step 12 (checkpoint saved); "
                                            "run the same command to resume"), err[-3000:]
    assert "Traceback" not in err and not (run / ".lock").exists()
    proc, err = _signalled(tmp_path, run, signal.SIGINT, pause_call=2)
    assert proc.returncode == loop.EXIT_STOPPED and "Traceback" not in err, err[-3000:]
    assert "stopped by SIGINT at step 20 (checkpoint saved)" in err.strip().splitlines()[-1]
    done = subprocess.run(_cmd(run), env=ENV1, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(full, run)


def test_ctrl_c_while_starting_or_compiling_is_one_line(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path / "run"), env=ENV1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("jaxconcept train:")  # printed as training starts: compiling next
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("jaxconcept train:")]
    assert proc.returncode in (130, loop.EXIT_STOPPED), err[-3000:]
    assert "Traceback" not in err and len(lines) == 1 and ("interrupted" in lines[0] or "stopped by SIGINT" in lines[0])


def test_importing_checkpoint_leaves_logging_alone():
    code = ("import logging; import absl.logging; before = logging.getLogger('absl').level; "
            "import jaxconcept.train.checkpoint; print(before, logging.getLogger('absl').level)")
    out = subprocess.run([sys.executable, "-c", code], env=ENV1, capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert before == after  # orbax is quieted only while it runs


# --------------------------------------------------------------------------------------------
# Several processes (jax.distributed on 127.0.0.1)
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out, wait_for=None):
    port = _free_port()
    procs = [subprocess.Popen(_cmd(out) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                           "--process-id", str(i)], env=ENV1, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    if wait_for is not None:  # kill both as soon as the first checkpoint is committed
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "checkpoints" / "8" / "_CHECKPOINT_METADATA").exists():
            time.sleep(0.05)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs


def test_two_processes_equal_one_and_resume_after_both_are_killed(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env2 = dict(ENV1, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {OPT0}")  # the same 2-device layout
    subprocess.run(_cmd(one), check=True, env=env2, capture_output=True)
    codes, outs = _two_processes(two, wait_for=8)
    assert codes == [-signal.SIGKILL] * 2, outs
    assert rundir.steps_with(two) != [8, 16, 24], "the run finished before it was killed"
    codes, outs = _two_processes(two)
    assert codes == [0, 0], [o[1][-2000:] for o in outs]
    _same_run(one, two)
    assert "jaxconcept train: done" in outs[0][0] and "jaxconcept train: done" not in outs[1][0]  # process 0 speaks


def test_distributed_without_peers_is_one_clear_message(capsys, monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["train", "--preset", "vec_tiny", "--out", "/tmp/never", "--num-processes", "2"]) == 2
    assert "go together" in capsys.readouterr().err
    args = ["train", "--preset", "vec_tiny", "--out", "/tmp/never", "--coordinator", "nohost", "--num-processes", "2",
            "--process-id", "0"]
    assert cli.main(args) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert cli.main(args[:-6] + ["--coordinator", "1.2.3.4:5", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "0 <= I < N" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# One run directory, one writer; damaged files
# --------------------------------------------------------------------------------------------
def _cfg(*more):
    return C.override(C.preset("vec_tiny"), [*SETS, "train.steps=8", "eval.steps=[8]", *more])


def test_a_second_train_on_a_locked_directory_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with rundir.lock(tmp_path / "run"):
        with pytest.raises(loop.RunError, match=f"in use by pid {os.getpid()}"):
            loop.train(_cfg(), tmp_path / "run", progress=False)
        assert cli.main(["train", "--preset", "vec_tiny", "--out", str(tmp_path / "run")] +
                        [a for s in SETS for a in ("--set", s)]) == 2
        assert "in use by" in capsys.readouterr().err
    loop.train(_cfg(), tmp_path / "run", progress=False)  # released: a stale lock file is taken over
    assert rundir.steps_with(tmp_path / "run") == [8]
    assert not (tmp_path / "run" / ".lock").exists()  # removed at exit
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "members.json", "metrics.jsonl", "samples/step_0000008.npz", "params/step_0000008.npz"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's 0600


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)  # a group that shares a file system
    try:
        rundir.write_json(tmp_path / "a.json", {"x": 1})
        rundir.save_tree(tmp_path / "t.npz", {"w": np.zeros(2)})
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "t.npz")] == [0o664, 0o664]


def test_a_process_that_opened_the_lock_as_its_holder_finished_locks_the_current_file(tmp_path, monkeypatch):
    import contextlib
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    first = contextlib.ExitStack()
    first.enter_context(rundir.lock(run))
    flock = fcntl.flock

    def holder_finishes_first(fd, op):  # between the second process's open and its flock
        first.close()
        return flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", holder_finishes_first)
    with rundir.lock(run):
        monkeypatch.setattr(fcntl, "flock", flock)
        with pytest.raises(rundir.RunDirError, match=f"in use by pid {os.getpid()}"):
            with rundir.lock(run):  # a third process finds the lock held, on the file that is there
                pass
    assert not (run / ".lock").exists()


def test_train_steps_may_grow_and_not_shrink(tmp_path, capsys):
    sets = [*SETS[:3], "eval.steps=[]", "eval.n_points=3", "eval.first=4", *SETS[4:]]  # sqrt-spaced points
    short, long = (C.override(C.preset("vec_tiny"), [*sets, f"train.steps={n}"]) for n in (16, 24))
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    loop.train(short, grown, progress=False)
    loop.train(long, grown, progress=False)
    loop.train(long, fresh, progress=False)
    # the points written stay; beyond the old end, the longer run's own
    assert C.eval_steps(short) == [4, 9, 16] and C.eval_steps(long) == [4, 11, 24]
    assert rundir.steps_with(grown) == [4, 9, 16, 24] and rundir.steps_with(fresh) == [4, 11, 24]
    for step in (4, 24):
        np.testing.assert_array_equal(rundir.load_samples(grown, step)["samples"],
                                      rundir.load_samples(fresh, step)["samples"])
    pg, pf = np.load(grown / "params" / "step_0000024.npz"), np.load(fresh / "params" / "step_0000024.npz")
    for k in pf.files:
        np.testing.assert_array_equal(pg[k], pf[k])
    assert C.load(grown / "config.json") == long == C.load(grown / "checkpoints" / "config.json")
    args = ["train", "--preset", "vec_tiny", *[a for s in sets for a in ("--set", s)], "--set", "train.steps=16",
            "--out", str(grown)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "may grow, not shrink" in err and len(err.strip().splitlines()) == 1


def test_damaged_run_files_are_repaired_or_refused_with_one_message(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg()
    loop.train(cfg, run, progress=False)
    # members.json lost or garbled: rewritten
    (run / "members.json").write_text("{garbage")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "train_lo')  # a half line from a kill
    (run / "samples" / ".step_0000016.npz.1234.tmp").write_bytes(b"partial")  # a leftover temporary file
    loop.train(cfg, run, progress=False)
    assert len(rundir.load_members(run)) == 2
    assert [r["step"] for r in rundir.load_metrics(run)] == [8]  # the half line is gone
    assert rundir.steps_with(run) == [8]
    # config.json lost: the same config resumes (and rewrites it), another one is refused
    (run / "config.json").unlink()
    with pytest.raises(loop.RunError, match=r"train\.lr"):
        loop.train(C.override(cfg, ["train.lr=0.01"]), run, progress=False)
    loop.train(cfg, run, progress=False)
    assert C.load(run / "config.json") == cfg
    (run / "config.json").unlink()
    (run / "checkpoints" / "config.json").unlink()
    with pytest.raises(loop.RunError, match="no config.json"):
        loop.train(cfg, run, progress=False)


def test_analyze_and_elicit_name_damaged_files(tmp_path, capsys):
    run = tmp_path / "run"
    loop.train(_cfg("eval.steps=[4,8]"), run, progress=False)
    (run / "samples" / "step_0000004.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert cli.main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err
    assert "step_0000004.npz is damaged" in err and "Traceback" not in err
    (run / "samples" / "step_0000004.npz").unlink()
    assert cli.main(["analyze", str(run)]) == 0
    json.loads((run / "analysis.json").read_text())
    (run / "analysis.json").write_text('{"members": [')  # truncated
    assert cli.main(["elicit", str(run)]) == 2
    assert "analysis.json is unreadable" in capsys.readouterr().err
    (run / "params" / "step_0000008.npz").write_bytes(b"\x00" * 50)
    (run / "analysis.json").unlink()
    assert cli.main(["elicit", str(run)]) == 2
    assert "step_0000008.npz is damaged" in capsys.readouterr().err


def test_analyze_counts_nan_samples_as_wrong_and_marks_frozen_members(tmp_path):
    from jaxconcept.analysis import analyze

    run = tmp_path / "run"
    cfg = _cfg("eval.steps=[4,8]")
    loop.train(cfg, run, progress=False)
    s = rundir.load_samples(run, 8)
    samples = s["samples"].copy()
    samples[1, 0, :5] = np.nan  # member 1, class 0: five samples diverged
    rundir.save_samples(run, 8, samples, s["prompts"])
    recs = rundir.load_metrics(run)
    recs[-1]["frozen"] = [False, True]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    a = analyze.analyze_run(run)
    assert a["members"][1]["nan_samples"] == 5 and a["members"][0]["nan_samples"] == 0
    assert a["members"][1]["frozen_at"] == 8 and a["members"][0]["frozen_at"] is None
    acc = a["members"][1]["accuracy"]["0-0"]["joint"][-1]
    assert acc <= 1 - 5 / cfg.eval.n_samples + 1e-9
    text = (run / "analysis.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


# --------------------------------------------------------------------------------------------
# Hostile inputs: one message, exit code 2, no traceback, nothing written
# --------------------------------------------------------------------------------------------
def _bad_inputs(tmp):
    f = tmp / "afile"
    f.write_text("x")
    binary = tmp / "binary.json"
    binary.write_bytes(bytes(range(256)))
    other = tmp / "other_run"
    other.mkdir()
    C.save(C.override(C.preset("vec_tiny"), ["train.lr=0.5"]), other / "config.json")
    noheld = tmp / "noheld"
    noheld.mkdir()
    C.save(C.override(C.preset("vec_tiny"), ["data.train_classes=[0,1,2,3]"]), noheld / "config.json")
    (noheld / "params").mkdir()
    (noheld / "params" / "step_0000001.npz").write_bytes(b"")
    t = ["train", "--preset", "vec_tiny", "--out"]
    return [
        (["train", "--config", str(binary), "--out", str(tmp / "r")], "not valid JSON"),
        (["train", "--config", str(tmp), "--out", str(tmp / "r")], "not a file"),
        (t + [str(tmp / "r"), "--set", "seeds=[4294967296]"], "seeds"),
        (t + [str(tmp / "r"), "--set", "data.m=[]"], "data.m"),
        (t + [str(tmp / "r"), "--set", "train.lr=NaN"], "train.lr"),
        (t + [str(tmp / "r"), "--set", "name=[1,2]"], "name"),
        (t + [str(f)], "is a file"),
        (t + [str(f / "sub")], "is a file"),
        (["data", "--preset", "vec_tiny", "--out", str(tmp / "missing" / "d.npz")], "does not exist"),
        (["data", "--preset", "vec_tiny", "--show", str(tmp)], "is a directory"),
        (["demo", "--out", str(other), "--set", "train.steps=2"], "different config"),
        (["elicit", str(noheld)], "held-out"),
        (["analyze", str(f)], "not a directory"),
    ]


def test_hostile_inputs_end_in_one_message(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    for argv, needle in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv  # nothing written
    for threshold in ("2", "-1", "nan", "0"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["analyze", str(tmp_path), "--threshold", threshold])
        assert exc.value.code == 2 and "(0, 1]" in capsys.readouterr().err


def test_storage_that_refuses_writes_is_one_message(capsys):
    # /sys refuses new directories even to root: a stand-in for read-only storage
    assert cli.main(["train", "--preset", "vec_tiny", "--out", "/sys/jaxconcept_run"]) == 2
    err = capsys.readouterr().err
    assert "not permitted" in err and "/sys/jaxconcept_run" in err and len(err.strip().splitlines()) == 1
