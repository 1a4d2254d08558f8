"""Same seeds, same numbers: tiny runs of `jaxconcept train` give the samples, losses and
parameters stored from an earlier main (tests/fixtures/make_bitid.py wrote them;
tests/bitid_cases.py says what is run, compared, and within which tolerance: the stored numbers
come from another processor, whose XLA:CPU code differs in the last bits)."""
import numpy as np
import pytest

from bitid_cases import CASES, FIXTURES, differences, run_case


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_matches_the_stored_one(name, tmp_path):
    with np.load(FIXTURES / f"{name}.npz") as f:
        want = {k: f[k] for k in f.files}
    got = run_case(name, tmp_path / "run")
    differ = differences(got, want)
    assert not differ, f"{len(differ)} of {len(want)} arrays differ from the stored run, e.g. " + ", ".join(differ[:5])


def test_the_comparison_sees_a_changed_number():
    """The tolerance is loose enough for another processor, not for a changed step."""
    want = {"params/10/w": np.linspace(-1, 1, 50, dtype=np.float32), "metrics/10/train_loss": np.array([4000.0])}
    near = {"params/10/w": want["params/10/w"] + 2e-6, "metrics/10/train_loss": want["metrics/10/train_loss"] * (1 + 1e-7)}
    assert differences(near, want) == []
    moved = dict(near, **{"params/10/w": want["params/10/w"] * (1 + 1e-3)})
    assert [d.split()[0] for d in differences(moved, want)] == ["params/10/w"]
