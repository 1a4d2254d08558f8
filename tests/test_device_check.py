"""benchmarks/device_check.py in its --tiny mode: the JSON it writes has every field, with sane
values; a spent budget skips stages (naming them) instead of overrunning; the check's programs are
the run's; the measured stacking table merges as documented."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(BENCH))  # its helper modules (stacking, check_report, ...) sit beside it
    spec = importlib.util.spec_from_file_location("device_check", BENCH / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_tiny_run_writes_sane_json(device_check, tmp_path):
    # a generous budget: every stage ends when its work is done, so it only bounds a slow machine
    out = device_check.main(["--tiny", "--no-compare", "--measure-s", "0.05", "--budget-s", "900",
                             "--out", str(tmp_path), "--compile-cache", str(tmp_path / "xla")])
    data = json.loads((tmp_path / "device_check.json").read_text())
    assert data == json.loads(json.dumps(out))  # what main returns is what it wrote
    assert data["complete"] and not data["errors"], data["errors"]
    assert [s["what"] for s in data["skipped"]] == ["torch"], data["skipped"]  # no --reference
    assert data["device"]["backend"] == "cpu" and data["tiny"] and data["torch"] == []
    assert data["config"]["run_members"] == 2 and data["config"]["steps_per_call"] == 5
    assert set(data["stages"]) == {"ceiling", "flops", "train", "torch", "sampler", "sd"}

    c = data["ceiling"]
    assert c["dtype"] == "float32" and _positive(c["tflops"]) and _positive(c["seconds_per_matmul"])
    assert _positive(data["flops_per_model_step"])
    assert data["init"]["members"] == 2 and _positive(data["init"]["compile_s"])

    (row,) = data["train"]  # the run's own program: its size, dtype and the CPU's stacking
    assert (row["dtype"], row["members"], row["stacking"]) == ("bfloat16", 2, "unroll")
    assert row["status"] == "ok" and row["loss_finite"] and row["calls"] >= 2
    for key in ("model_steps_per_s", "tflops", "compile_s", "lower_s", "step_s", "seconds", "compiled_bytes"):
        assert _positive(row[key]), (key, row[key])
    assert row["steps_per_call"] == 5 and 1 <= row["n_per_call"] <= 5
    assert math.isclose(row["model_steps_per_s"], 2 * row["n_per_call"] * row["calls"] / row["seconds"], rel_tol=1e-9)
    assert math.isclose(row["tflops"], row["model_steps_per_s"] * data["flops_per_model_step"] / 1e12, rel_tol=1e-6)
    assert row["mfu"] is None or 0 < row["mfu"] <= 1
    assert data["winners"] == [] and not (tmp_path / "strategies.json").exists()  # nothing was compared

    s = data["sampler"]  # the run's evaluate program: 4 sampler steps, 4 samples of each class
    assert s["members"] == 2 and s["sampler_steps"] == 4 and s["samples_per_member"] % 4 == 0
    assert _positive(s["seconds_per_member"]) and math.isclose(s["seconds_per_member"] * 2, s["seconds_per_call"])

    (sd,) = data["sd"]  # the tiny Stable Diffusion model, compiled ahead in the background
    assert (sd["dtype"], sd["size"], sd["batch"], sd["n_steps"]) == ("float32", 32, 1, 2) and sd["finite"]
    for key in ("guided_steps_per_s", "images_per_s", "tflops", "flops_per_guided_step", "sample_s", "decode_s"):
        assert _positive(sd[key]), (key, sd[key])
    assert math.isclose(sd["images_per_s"], 1 / (sd["sample_s"] + sd["decode_s"]), rel_tol=1e-6)


def test_winners_are_the_fastest_stacking_per_size(device_check):
    """Each size timed in several stackings gives the table's entry for the members per device
    around it (geometric midpoints), in the form plan.measured_choice reads."""
    import check_report as CR
    from jaxconcept.train import plan

    def row(m, stacking, strategy, rate, conv="auto", chunk=None, dtype="bfloat16", status="ok"):
        return {"dtype": dtype, "members": m, "stacking": stacking, "strategy": strategy, "chunk": chunk, "conv": conv,
                "status": status, "model_steps_per_s": rate}

    report = {"created": "2026-12-05T00:00:00+00:00", "commit": "abc", "tiny": False, "n_params": 10,
              "device": {"kind": "NVIDIA H200", "backend": "gpu", "jax": "0.11.2"},
              "config": {"arch": "unet", "batch_size": 64, "image_size": 32, "ch": 64, "ch_mult": [1, 2, 4],
                         "num_res_blocks": 2},
              "train": [row(8, "vmap", "vmap", 100.0), row(8, "map/1", "map", 150.0, chunk=1),
                        row(8, "vmap+explicit", "vmap", 120.0, conv="explicit"), row(1, "vmap", "vmap", 50.0),
                        row(32, "vmap", "vmap", 300.0), row(32, "map/8", "map", 900.0, chunk=8, status="error"),
                        row(32, "vmap+explicit", "vmap", 310.0, conv="explicit"),
                        row(96, "vmap", "vmap", 700.0), row(96, "map/8", "map", 800.0, chunk=8),
                        row(32, "map/1", "map", 999.0, chunk=1, dtype="float32")]}
    got = CR.winners(report)
    assert [(w["members"], w["min_members"], w.get("max_members"), w["strategy"], w["chunk"], w["conv"])
            for w in got] == [(8, 1, 16, "map", 1, "auto"), (32, 17, 55, "vmap", 1, "explicit"),
                              (96, 56, None, "map", 8, "auto")]
    assert got[0]["timed"] == {"vmap": 100.0, "map/1": 150.0, "vmap+explicit": 120.0}
    assert got[1]["device_kind"] == "NVIDIA H200" and got[1]["shape"]["n_params"] == 10 and "tiny" not in got[1]
    for m, want in ((1, 8), (16, 8), (17, 32), (55, 32), (56, 96), (1000, 96)):
        assert plan.measured_choice("NVIDIA H200", "unet", m, got)["members"] == want
    assert plan.measured_choice("NVIDIA H100", "unet", 8, got) is None


def test_spent_budget_skips_and_says_so(device_check, tmp_path):
    data = device_check.main(["--tiny", "--members", "1,2", "--map-chunks", "1", "--budget-s", "0",
                              "--out", str(tmp_path), "--no-compile-cache"])
    assert data["complete"] and data["train"] == [] and data["ceiling"] is None and data["sampler"] is None
    skipped = {s["what"] for s in data["skipped"]}
    assert {"ceiling", "flops", "sampler", "sd float32", "torch"} <= skipped and data["sd"] == []
    assert sum(w.startswith("train ") for w in skipped) == 3 + 1  # 2 members: unroll, vmap, map/1; 1 member
    assert json.loads((tmp_path / "device_check.json").read_text())["skipped"] == data["skipped"]


def test_the_checks_programs_are_the_runs(device_check):
    """The check's rows change only members, dtype, stacking and conv of the run's config, so its
    run-sized program lowers to the same text as the one `jaxconcept train` compiles (the
    persistent cache's key) and other sizes keep every shape but the model axis."""
    import jax

    import stacking as S
    from jaxconcept import config as C
    from jaxconcept.train import programs, stack

    a = device_check.parse(["--tiny"])
    base = C.resolve(None, a.config, a.all_sets)
    assert len(C.members(base)) == 2 and S.member_config(base, 2) is base
    for m in (1, 6, 7):
        assert len(C.members(S.member_config(base, m))) == m
    row = S.row_sweep(base, S.Row("bfloat16", 2, "vmap"), jax.devices()[:1])
    run = stack.build(C.resolve(None, a.config, a.all_sets), jax.devices()[:1], strategy="vmap")
    assert programs.lower(row, "advance").as_text() == programs.lower(run, "advance").as_text()
    six = S.row_sweep(base, S.Row("bfloat16", 6, "vmap"), jax.devices()[:1])
    shapes = lambda sw: [a.shape[1:] for a in jax.tree.leaves(programs.abstract_inputs(sw)["advance"])]  # noqa: E731
    assert shapes(six) == shapes(row)


def test_strategies_table_merges(device_check, tmp_path):
    import check_report as CR

    def entry(kind, m, strategy, **kw):
        return {"device_kind": kind, "arch": "unet", "min_members": m, "strategy": strategy, "source": "test", **kw}

    table, run = tmp_path / "strategies.json", tmp_path / "run.json"
    CR.write_json(table, {"_doc": "kept", "measured": [entry("cpu", 1, "unroll"), entry("H200", 1, "vmap")]})
    CR.write_json(run, {"measured": [entry("H200", 1, "map", max_members=16), entry("H200", 17, "vmap")]})
    assert CR.merge_strategies(run, table) == 3
    got = json.loads(table.read_text())
    assert got["_doc"] == "kept"  # the device kind's old entries replaced, the others kept
    assert [(e["device_kind"], e["min_members"], e["strategy"]) for e in got["measured"]] == [
        ("cpu", 1, "unroll"), ("H200", 1, "map"), ("H200", 17, "vmap")]

    CR.write_json(run, {"measured": [entry("cpu", 1, "vmap", tiny=True)]})
    with pytest.raises(ValueError, match="tiny"):
        CR.merge_strategies(run, table)
    CR.write_json(run, {"entries": []})
    with pytest.raises(ValueError, match="measured"):
        CR.merge_strategies(run, table)
    CR.write_json(run, {"measured": [{"device_kind": "H200", "arch": "unet"}]})
    with pytest.raises(ValueError, match="strategy, source"):
        CR.merge_strategies(run, table)
    shipped = CR._read_table(BENCH.parent / "jaxconcept" / "train" / "strategies.json")  # the package's table reads
    assert all(not e.get("tiny") for e in shipped["measured"])


def test_merge_command_says_what_is_wrong_in_one_line(device_check, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit) as exc:
        device_check.main(["--merge-strategies", str(bad), "--into", str(tmp_path / "t.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("device_check: ") and "\n" not in err and "not a readable stacking table" in err
