"""benchmarks/device_check.py in its --tiny mode: the JSON it writes has every field, with sane
values, and a spent budget skips stages (naming them) instead of overrunning."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_tiny_run_writes_sane_json(device_check, tmp_path):
    out = device_check.main(["--tiny", "--members", "2", "--strategies", "vmap", "--dtypes", "float32",
                             "--measure-s", "0.05", "--budget-s", "300", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "device_check.json").read_text())
    assert data == json.loads(json.dumps(out))  # what main returns is what it wrote
    assert data["complete"] and not data["errors"], data["errors"]
    assert data["device"]["backend"] == "cpu" and data["preset"] == "tiny"

    c = data["ceiling"]
    assert c["dtype"] == "float32" and _positive(c["tflops"]) and _positive(c["seconds_per_matmul"])
    assert _positive(data["flops_per_model_step"])

    (row,) = data["train"]
    assert row["status"] == "ok" and (row["dtype"], row["members"], row["strategy"]) == ("float32", 2, "vmap")
    for key in ("model_steps_per_s", "tflops", "compile_s", "step_s", "seconds", "compiled_bytes"):
        assert _positive(row[key]), (key, row[key])
    # --steps-per-call's default: the U-Net scans on CPU too (model.conv "auto" = "explicit" there)
    assert row["calls"] >= 2 and row["steps_per_call"] == 10 and row["loss_finite"]
    assert row["mfu"] is None or 0 < row["mfu"] <= 1
    assert math.isclose(row["tflops"], row["model_steps_per_s"] * data["flops_per_model_step"] / 1e12, rel_tol=1e-6)
    assert row["peak_bytes_in_use"] is None or row["peak_bytes_in_use"] > 0  # CPU: no allocator statistics

    s = data["sampler"]
    assert s["members"] == 2 and s["n_steps"] == 4 and s["samples_per_member"] == 4 * 4
    assert _positive(s["seconds_per_member"]) and _positive(s["samples_per_s"])
    assert math.isclose(s["seconds_per_member"] * 2, s["seconds_per_call"], rel_tol=1e-6)
    assert data["reference"] is None  # not asked for

    (sd,) = data["sd"]  # the tiny Stable Diffusion model: sampling and decoding timed
    assert (sd["dtype"], sd["size"], sd["batch"], sd["n_steps"]) == ("float32", 32, 1, 2) and sd["finite"]
    for key in ("guided_steps_per_s", "images_per_s", "tflops", "flops_per_guided_step", "sample_s", "decode_s"):
        assert _positive(sd[key]), (key, sd[key])
    assert math.isclose(sd["guided_steps_per_s"], 2 / sd["sample_s"], rel_tol=1e-6)
    assert math.isclose(sd["images_per_s"], 1 / (sd["sample_s"] + sd["decode_s"]), rel_tol=1e-6)
    assert data["elapsed_s"] < 300


def test_spent_budget_skips_and_says_so(device_check, tmp_path):
    data = device_check.main(["--tiny", "--members", "1,2", "--budget-s", "0", "--out", str(tmp_path)])
    assert data["complete"] and data["train"] == [] and data["ceiling"] is None and data["sampler"] is None
    skipped = {s["what"] for s in data["skipped"]}
    assert {"ceiling", "flops", "sampler", "sd bfloat16", "sd float32"} <= skipped and data["sd"] == []
    assert sum(w.startswith("train ") for w in skipped) == 2 * 2 + 2 * 1  # 2 dtypes x (1 + 2 stackings)
    assert json.loads((tmp_path / "device_check.json").read_text())["skipped"] == data["skipped"]
