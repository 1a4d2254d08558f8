"""Learning times and sudden turns on synthetic curves and trajectories with known answers."""
import numpy as np
import pytest

from jaxconcept.analysis import dynamics as Dy

CORNERS = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # training classes of a 2x2 (class 3 held out)


def _segment(a, b, n):
    """n points from a (exclusive) to b (inclusive)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a + np.linspace(0, 1, n + 1)[1:, None] * (b - a)


def _memorise_then_turn(n_in=6, n_rest=5, n_out=6):
    """Centre -> red-small corner (0, 1) -> rest there -> blue-small target (1, 1)."""
    traj = np.concatenate([[[0.5, 0.5]], _segment([0.5, 0.5], [0.05, 0.95], n_in),
                           np.repeat([[0.05, 0.95]], n_rest, axis=0), _segment([0.05, 0.95], [0.95, 0.95], n_out)])
    last_rest = n_in + n_rest  # index of the last checkpoint at the corner
    return traj, last_rest


def test_first_crossing_interpolates_between_checkpoints():
    steps = np.array([100, 200, 400, 800])
    acc = np.array([0.0, 0.5, 0.9, 1.0])
    # 0.8 lies 3/4 of the way from 0.5 (step 200) to 0.9 (step 400)
    assert Dy.first_crossing(steps, acc, 0.8) == pytest.approx(200 + 0.75 * 200)
    assert Dy.first_crossing(steps, acc, 0.5) == pytest.approx(200)  # exactly on a checkpoint
    assert Dy.first_crossing(steps, acc, 0.95) == pytest.approx(400 + 0.5 * 400)


def test_first_crossing_never_learned_and_learned_from_start():
    steps = np.arange(1, 11) * 100
    assert Dy.first_crossing(steps, np.linspace(0, 0.79, 10), 0.8) is None
    assert Dy.first_crossing(steps, np.full(10, np.nan), 0.8) is None
    assert Dy.first_crossing(steps, np.full(10, 0.9), 0.8) == 100


def test_first_crossing_of_a_noisy_curve_counts_a_fluke():
    rng = np.random.default_rng(0)
    steps = np.arange(40) * 50 + 50
    acc = np.clip(np.where(np.arange(40) < 20, 0.3, 0.95) + rng.normal(0, 0.03, 40), 0, 1)
    t = Dy.first_crossing(steps, acc, 0.8)
    assert steps[19] < t <= steps[20]
    acc[5] = 0.85  # one noisy early crossing counts: T is the *first* step at the threshold
    assert steps[4] < Dy.first_crossing(steps, acc, 0.8) <= steps[5]


def test_turn_found_where_the_trajectory_leaves_the_nearest_training_corner():
    traj, last_rest = _memorise_then_turn()
    steps = (np.arange(len(traj)) + 1) * 100
    out = Dy.sudden_turn(steps, traj, CORNERS)
    assert out["nearest"] == 1  # red-small, the corner it memorised
    assert out["index"] == last_rest and out["step"] == steps[last_rest]
    assert out["turned"] and 125 < out["angle"] < 145  # arrived going up-left (diagonal), leaves rightwards
    assert out["approach_step"] == steps[6]


def test_turn_robust_to_noise():
    rng = np.random.default_rng(1)
    traj, last_rest = _memorise_then_turn(n_in=8, n_rest=8, n_out=8)
    steps = np.arange(len(traj)) * 10
    found = []
    for _ in range(20):
        out = Dy.sudden_turn(steps, traj + rng.normal(0, 0.015, traj.shape), CORNERS)
        assert out["nearest"] == 1 and out["turned"]
        found.append(out["index"])
    assert np.median(np.abs(np.array(found) - last_rest)) <= 1
    assert max(abs(f - last_rest) for f in found) <= 3


def test_no_turn_for_straight_or_memorising_trajectories():
    steps = np.arange(11) * 100
    straight = _segment([0.5, 0.5], [1.0, 1.0], 10)
    straight = np.concatenate([[[0.5, 0.5]], straight])
    out = Dy.sudden_turn(steps, straight, CORNERS)
    assert not out["turned"] and out["angle"] < 5
    stuck = np.concatenate([[[0.5, 0.5]], _segment([0.5, 0.5], [0.0, 1.0], 4), np.repeat([[0.0, 1.0]], 6, axis=0)])
    out = Dy.sudden_turn(steps, stuck, CORNERS)  # never leaves the corner: no outgoing chord
    assert out["step"] is None and not out["turned"] and out["min_distance"] == pytest.approx(0.0)


def test_turn_angles_bridge_short_moves():
    # a square path with tiny jitter between its corners: the chord rule sees only the 90 degree bends
    traj = np.array([[0, 0], [0.5, 0], [0.5, 0.01], [0.51, 0.0], [1.0, 0.0], [1.0, 0.5], [1.0, 1.0]])
    ang = Dy.turn_angles(traj, 0, min_chord=0.1)
    assert np.isnan(ang[0]) and np.isnan(ang[-1])
    assert ang[4] == pytest.approx(90, abs=1)
    assert np.nanmax(ang[1:4]) < 5


def test_summarize_times_groups_seeds():
    def rec(sep, seed, t):
        return {"sep_col": sep, "sep_size": 0.4, "m": [1, 1], "s": [0.05, 0.05], "seed": seed,
                "signal": {"colour": 10 * sep}, "learning_time": {"c": {"colour": t}}}
    ms = [rec(0.2, 0, 1000.0), rec(0.2, 1, 1200.0), rec(0.4, 0, 500.0), rec(0.4, 1, None)]
    rows = Dy.summarize_times(ms, "c", "colour", run_length=2000)
    assert [r["separation"] for r in rows] == [0.2, 0.4]
    assert rows[0]["mean"] == pytest.approx(1100) and rows[0]["std"] == pytest.approx(100)
    # never is censored at the run length, not dropped
    assert rows[1]["n"] == 2 and rows[1]["n_learned"] == 1 and rows[1]["mean"] == pytest.approx(1250)
    assert rows[0]["signal"] == pytest.approx(2.0)


def test_turn_angle_is_the_peak_even_when_the_rest_runs_to_the_last_checkpoint():
    # the peak (a back-step at index 2) is followed by one stray checkpoint and a rest that lasts to
    # the end, where no outgoing chord exists: the reported angle must still be the peak's
    traj = np.array([[0.0, 0.0], [0.25, 0.0], [0.5, 0.0], [0.3, 0.0], [0.5, 0.01], [0.5, 0.0]])
    out = Dy.sudden_turn(np.arange(6) * 10, traj, np.array([[1.0, 0.0]]))
    assert out["index"] == 5 and out["angle"] is not None and out["angle"] > 170 and out["turned"]
