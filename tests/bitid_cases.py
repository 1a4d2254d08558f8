"""What the bit-identity test (tests/test_bitid.py) runs and compares: a few tiny training runs,
each reduced to the numbers a run writes (metrics less timing, samples and prompts at every
evaluation step, and a SHA-256 digest of each parameter leaf at every evaluation step: as strict
as the arrays, a fraction of their size), as one flat dict of numpy arrays.

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
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bitid"


def run_case(name: str, out: Path) -> dict:
    """Train case ``name`` into ``out`` and return its numbers (``collect``)."""
    from jaxconcept import cli

    assert cli.main(["train", *CASES[name], "--no-progress", "--out", str(out)]) == 0
    return collect(out)


def collect(run_dir: Path) -> dict:
    """{"metrics/<step>/<field>", "samples/<step>/<array>": numpy array, "params/<step>/<leaf>":
    digest [32] uint8 of the leaf's dtype, shape and bytes}."""
    import hashlib
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
                    a = f[k]
                    if sub == "params":
                        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
                        a = np.frombuffer(h.digest(), np.uint8)
                    out[f"{sub}/{step}/{k}"] = a
    return out
