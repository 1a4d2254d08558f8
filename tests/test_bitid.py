"""Same seeds, same numbers: tiny runs of `jaxconcept train` give, bit for bit, the samples,
losses and parameters stored from main before the sweep engine was split
(tests/fixtures/make_bitid.py wrote them; tests/bitid_cases.py says what is run and compared)."""
import numpy as np
import pytest

from bitid_cases import CASES, FIXTURES, run_case


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_is_bit_identical_to_the_stored_one(name, tmp_path):
    with np.load(FIXTURES / f"{name}.npz") as f:
        want = {k: f[k] for k in f.files}
    got = run_case(name, tmp_path / "run")
    assert sorted(got) == sorted(want)
    differ = [k for k in sorted(want) if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
              or not np.array_equal(got[k], want[k], equal_nan=True)]
    assert not differ, f"{len(differ)} of {len(want)} arrays differ from the stored run, e.g. " + ", ".join(
        f"{k} (max |diff| {np.max(np.abs(got[k].astype(np.float64) - want[k])):.3g})"
        if got[k].shape == want[k].shape else f"{k} (shape {got[k].shape} vs {want[k].shape})" for k in differ[:5])
