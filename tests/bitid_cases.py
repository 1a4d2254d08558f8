"""What the stored-run test (tests/test_bitid.py) runs and compares: a few tiny training runs,
each reduced to the numbers a run writes (metrics less timing, samples and prompts at every
evaluation step, and every parameter leaf at every evaluation step), as one flat dict of numpy
arrays. The stored numbers were made on one processor; XLA:CPU's code differs between processors,
so the test compares them within ``TOLERANCE`` (bit-identity is checked only between numbers made
in the same test on the same machine: tests/test_loop.py, tests/test_sweep.py).

The cases run through the command line's entry point (``cli.main(["train", ...])``), which
stays put whatever the engine's modules are called, in the test session's XLA settings
(tests/conftest.py: 8 forced CPU devices, backend optimisation level 0): the stored numbers
are those of that setting, so tests/fixtures/make_bitid.py writes them under the same one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# name -> the arguments of `jaxconcept train` (before --out)
CASES = {
    "vec_tiny": ["--preset", "vec_tiny"],
    "tiny": ["--preset", "tiny"],
}
METRICS = ("train_loss", "val_loss", "test_loss", "frozen")  # metrics.jsonl less steps_per_s (timing)
# (rtol, atol) per kind of number. Measured: an Intel Xeon (AVX-512, and with XLA_FLAGS
# --xla_cpu_max_isa=AVX2 or SSE4_2) against the AMD EPYC that wrote the fixtures differs by at most
# ~2e-6 in samples and parameters and not at all in the losses after 20 steps; a changed step (an
# optimiser, a loss term, a batch order) moves them by 1e-3 or more.
TOLERANCE = {"metrics": (1e-5, 0.0), "samples": (1e-4, 1e-4), "params": (1e-4, 1e-5)}
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bitid"


def run_case(name: str, out: Path) -> dict:
    """Train case ``name`` into ``out`` and return its numbers (``collect``)."""
    from jaxconcept import cli

    assert cli.main(["train", *CASES[name], "--no-progress", "--out", str(out)]) == 0
    return collect(out)


def collect(run_dir: Path) -> dict:
    """{"metrics/<step>/<field>", "samples/<step>/<array>", "params/<step>/<leaf>": numpy array}."""
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k in METRICS:
            if k in r:
                out[f"metrics/{r['step']}/{k}"] = np.asarray(r[k], np.float64 if k != "frozen" else bool)
    for sub in ("samples", "params"):
        for p in sorted((run_dir / sub).glob("step_*.npz")):
            step = int(p.stem.split("_")[1])
            with np.load(p) as f:
                for k in f.files:
                    out[f"{sub}/{step}/{k}"] = f[k]
    return out


def differences(got: dict, want: dict) -> list[str]:
    """The arrays of ``got`` that differ from ``want`` beyond ``TOLERANCE`` (or in dtype, shape,
    or which arrays there are), each described in a few words."""
    out = [f"{k} (missing)" for k in sorted(set(want) - set(got))] + [f"{k} (not stored)" for k in sorted(set(got) - set(want))]
    for k in sorted(set(want) & set(got)):
        a, b = got[k], want[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{k} ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})")
        elif a.dtype.kind in "fc":
            rtol, atol = TOLERANCE[k.split("/")[0]]
            if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                out.append(f"{k} (max |diff| {np.max(np.abs(a.astype(np.float64) - b)):.3g})")
        elif not np.array_equal(a, b):
            out.append(f"{k} (not equal)")
    return out
