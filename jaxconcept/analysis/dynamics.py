"""Learning dynamics in concept space (docs/study.md A3): trajectories, accuracies, learning times, turns.

Pure functions over arrays; ``analyze.analyze_run`` applies them to every member and checkpoint
of a run directory and writes RUN_DIR/analysis.json.

Definitions used throughout:

* Coordinates of a sample: ``probe.coordinates`` (per concept in [0, 1]; P(second value) for a
  two-valued image concept). A class's *trajectory* is the mean over its samples, per checkpoint.
* Accuracy of a class at a checkpoint, per concept: the fraction of its samples showing the
  prompted value of that concept (``probe.correct``); *joint*: showing every prompted value.
* Learning time T (``learning_time``), two measures (``MEASURES``; ``DEFINITIONS`` says each in words):
    "reference" (the default; the reference's analysis_concept_space.ipynb): the accuracy curve
      is smoothed over checkpoints by a Gaussian of sigma 1.5 checkpoints (``smooth``: mode
      "reflect", truncated at 4 sigma, as scipy.ndimage.gaussian_filter1d), and T is the step of
      the first checkpoint i whose smoothed accuracy is above the threshold (0.9) at i-1, i and
      i+1 (a binary erosion with a window of 3 and nothing above the threshold outside the run,
      so neither the first nor the last checkpoint can be T); ``None`` = never, which the
      statistics count as the run's length, censored (``stats.censor``).
    "first_crossing": the first step at which the raw curve reaches the threshold (0.8),
      linearly interpolated between the two checkpoints around the crossing; the first
      checkpoint's step when it is already above. It counts single-checkpoint flukes.
* Saturation (``saturation``), the reference's turn marker: the first checkpoint at which the
  training classes' trajectories, smoothed by a Gaussian of sigma 2 checkpoints (truncated at 6
  sigma), lie within a mean squared distance of 0.01 of their corners (mean over classes and
  concepts). The reference computes it on trajectories averaged over seeds; here per member.
* Memorise, then generalise (``corner_path``): whether the held-out class is nearest the training
  class that shares all but its weakest-signal concept before it is first nearest its own corner,
  and whether it ends nearest its own corner.
* Sudden turn (``sudden_turn``), for a held-out class's trajectory p_0 .. p_{T-1}:
    1. The nearest training class c* is the training-class corner the trajectory comes closest to.
    2. The approach index a is the first checkpoint whose distance to c* is within ``tol`` of
       the minimum distance (``tol`` absorbs sampling noise, so a noisy plateau at the corner
       counts from its first checkpoint).
    3. For each checkpoint i >= a, the incoming direction is the chord p_i - p_j from the latest
       earlier checkpoint j at least ``min_chord`` away, the outgoing direction the chord
       p_k - p_i to the earliest later checkpoint k at least ``min_chord`` away (chords shorter
       than the noise of a mean over samples carry no direction, so short moves are bridged).
       The turn angle at i is the angle between the two chords (0 = straight on, 180 = back).
    4. The turn is the checkpoint of largest angle — or, when the trajectory rests there (the
       following checkpoints stay within ``min_chord / 2`` of the mean of the rest so far; a single stray
       checkpoint does not end a rest), the last checkpoint of that rest: a trajectory resting at
       a corner has nearly the same chords at each of its checkpoints, and the turn is when it
       *leaves*.
    5. ``turned`` = the angle is at least ``min_angle``. Without any checkpoint with both chords
       (the trajectory never moves ``min_chord`` after its approach) there is no turn (None).
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np

from jaxconcept.analysis import claims
from jaxconcept.analysis.probe import Probe, coordinates, correct
from jaxconcept.analysis import stats

SEPARATION_FIELD = {"colour": "sep_col", "size": "sep_size"}  # image concepts with a signal knob


# --------------------------------------------------------------------------------------------
# Per checkpoint
# --------------------------------------------------------------------------------------------
def class_coordinates(probe: Probe, samples) -> tuple[np.ndarray, np.ndarray]:
    """Concept-space coordinates of every sample and each class's mean.

    Args:
      samples: [n_classes, n_samples, *x_shape] one member's samples at one checkpoint.
    Returns:
      (per-sample [n_classes, n_samples, n_concepts], trajectory point [n_classes, n_concepts]).
    """
    samples = np.asarray(samples, np.float32)
    n_cls, n_s = samples.shape[:2]
    finite = finite_samples(samples)  # [n_cls, n_s]
    z = coordinates(probe, np.where(finite[..., None], samples.reshape(n_cls, n_s, -1), 0).reshape(
        n_cls * n_s, *samples.shape[2:])).reshape(n_cls, n_s, -1)
    z = np.where(finite[..., None], z, np.nan)  # non-finite samples have no coordinates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class with no finite sample: NaN
        return z, np.nanmean(z, axis=1)


def finite_samples(samples) -> np.ndarray:
    """[n_classes, n_samples, *x_shape] -> [n_classes, n_samples]: the sample is all finite."""
    return np.isfinite(samples.reshape(*samples.shape[:2], -1)).all(-1)


def class_accuracy(probe: Probe, samples, class_values) -> tuple[np.ndarray, np.ndarray]:
    """Per-concept and joint accuracy of each class's samples against its own prompt.

    Args:
      samples: [n_classes, n_samples, *x_shape]; class_values: [n_classes, n_concepts] value indices.
    Returns:
      (per-concept [n_classes, n_concepts], joint [n_classes]) fractions in [0, 1].
    """
    samples = np.asarray(samples, np.float32)
    n_cls, n_s = samples.shape[:2]
    target = np.repeat(np.asarray(class_values), n_s, axis=0)  # [n_cls * n_s, n_concepts]
    finite = finite_samples(samples)
    clean = np.where(finite.reshape(n_cls, n_s, *([1] * (samples.ndim - 2))), samples, 0)
    ok = correct(probe, clean.reshape(n_cls * n_s, *samples.shape[2:]), target).reshape(n_cls, n_s, -1)
    ok &= finite[..., None]  # a non-finite sample is wrong whatever the probe makes of it
    return ok.mean(axis=1), ok.all(axis=-1).mean(axis=1)


def corners(values, class_values) -> np.ndarray:
    """Concept-space position of each class: value index / (n_values - 1), [n_classes, n_concepts]."""
    return np.asarray(class_values, np.float64) / (np.asarray(values, np.float64) - 1.0)[None, :]


# --------------------------------------------------------------------------------------------
# Learning times and turns
# --------------------------------------------------------------------------------------------
MEASURES = ("reference", "first_crossing")
THRESHOLDS = {"reference": 0.9, "first_crossing": 0.8}  # each measure's default threshold
SIGMA_TIME, CONSECUTIVE = 1.5, 3  # the reference's smoothing (checkpoints) and window
SIGMA_TURN, TRUNCATE_TURN, SATURATED = 2.0, 6.0, 0.01  # the reference's saturation marker
DEFINITIONS = {
    "reference": "T = step of the first checkpoint whose accuracy, smoothed over checkpoints by a Gaussian of "
                 "sigma {sigma} checkpoints, is above {threshold} there and at both neighbours (the reference's); "
                 "never = the run length, censored",
    "first_crossing": "T = first step at which the raw accuracy reaches {threshold}, interpolated between "
                      "checkpoints; never = the run length, censored",
}


def definition(measure: str, threshold: float) -> str:
    """The learning-time measure in words, for analysis.json and the figures."""
    return DEFINITIONS[measure].format(sigma=SIGMA_TIME, threshold=threshold)


def smooth(values, sigma: float, truncate: float = 4.0, axis: int = 0) -> np.ndarray:
    """Gaussian smoothing along ``axis`` as scipy.ndimage.gaussian_filter1d(values, sigma, axis,
    mode="reflect", truncate=truncate): kernel radius int(truncate * sigma + 0.5), the edge
    sample repeated in the mirror (d c b a | a b c d | d c b a). Float64, same shape."""
    v = np.moveaxis(np.asarray(values, np.float64), axis, 0)
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    n = len(v)
    idx = np.arange(-r, n + r)
    while idx.min() < 0 or idx.max() >= n:  # reflect until inside (radius beyond the length)
        idx = np.where(idx < 0, -idx - 1, idx)
        idx = np.where(idx >= n, 2 * n - idx - 1, idx)
    pad = v[idx]
    out = sum(w * pad[i: i + n] for i, w in enumerate(k))
    return np.moveaxis(out, 0, axis)


def first_crossing(steps, acc, threshold: float = THRESHOLDS["first_crossing"]):
    """First step at which ``acc`` reaches ``threshold``, linearly interpolated (module doc).

    Args:
      steps: [T] increasing checkpoint steps; acc: [T] accuracies (NaN counts as not reached).
    Returns:
      float step, or None when the curve never reaches the threshold.
    """
    steps, acc = np.asarray(steps, np.float64), np.asarray(acc, np.float64)
    hit = np.nonzero(np.nan_to_num(acc, nan=-np.inf) >= threshold)[0]
    if not len(hit):
        return None
    i = int(hit[0])
    if i == 0 or not np.isfinite(acc[i - 1]):
        return float(steps[i])
    frac = (threshold - acc[i - 1]) / (acc[i] - acc[i - 1])  # acc[i-1] < threshold <= acc[i]
    return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))


def reference_time(steps, acc, threshold: float = THRESHOLDS["reference"], sigma: float = SIGMA_TIME,
                   consecutive: int = CONSECUTIVE):
    """The reference's learning time (module doc): the step of the first checkpoint i whose
    smoothed accuracy exceeds ``threshold`` at every checkpoint of the window of ``consecutive``
    (odd) centred on i; the window may not leave the run.

    Args:
      steps: [T] checkpoint steps; acc: [T] accuracies (NaN counts as 0).
    Returns:
      float step, or None (never; the statistics censor it at the run length).
    """
    if consecutive < 1 or consecutive % 2 == 0:
        raise ValueError(f"consecutive={consecutive} is invalid: allowed an odd integer >= 1")
    above = smooth(np.nan_to_num(np.asarray(acc, np.float64), nan=0.0), sigma) > threshold
    h = consecutive // 2
    for i in range(h, len(above) - h):
        if above[i - h: i + h + 1].all():
            return float(steps[i])
    return None


def learning_time(steps, acc, threshold: float | None = None, measure: str = "reference"):
    """Learning time of an accuracy curve by ``measure`` ("reference" or "first_crossing", module
    doc), at ``threshold`` (default: the measure's, ``THRESHOLDS``). Returns a step or None.
    Raises ValueError for an unknown measure."""
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is unknown: allowed {', '.join(MEASURES)}")
    threshold = THRESHOLDS[measure] if threshold is None else threshold
    return (reference_time if measure == "reference" else first_crossing)(steps, acc, threshold)


def saturation(steps, train_traj, train_corners, sigma: float = SIGMA_TURN, tol: float = SATURATED):
    """The reference's turn marker: the first step at which the training classes have saturated.

    Args:
      steps: [T]; train_traj: [K, T, n_concepts] the training classes' mean coordinates;
      train_corners: [K, n_concepts] their corners.
    Returns:
      (step or None, [T] mean squared distance to the corners after smoothing each trajectory
      along T by a Gaussian of ``sigma`` checkpoints truncated at 6 sigma, as the reference).
    """
    traj = smooth(np.nan_to_num(np.asarray(train_traj, np.float64), nan=0.5), sigma, TRUNCATE_TURN, axis=1)
    msd = ((traj - np.asarray(train_corners, np.float64)[:, None, :]) ** 2).mean(axis=(0, 2))  # [T]
    hit = np.flatnonzero(msd < tol)
    return (int(steps[hit[0]]) if len(hit) else None), msd


def corner_path(steps, traj, corners, own: int, memo: int) -> dict:
    """Memorise, then generalise, from the nearest class corner at each checkpoint.

    Args:
      steps: [T]; traj: [T, n_concepts] the held-out class's mean coordinates; corners:
      [n_classes, n_concepts] every class's corner; own: the held-out class; memo: the training
      class it is expected to pass (it shares all but the weakest-signal concept).
    Returns:
      {"memorised_step": first step nearest ``memo`` before the first step nearest ``own`` (None
      if none), "own_step": first step nearest ``own`` (None if never), "ends_own": nearest
      ``own`` at the last checkpoint, "memorise_then_generalise": both of the above}.
    """
    traj = np.nan_to_num(np.asarray(traj, np.float64), nan=-1.0)
    near = np.linalg.norm(traj[:, None, :] - np.asarray(corners, np.float64)[None], axis=-1).argmin(-1)  # [T]
    own_i = np.flatnonzero(near == own)
    first_own = int(own_i[0]) if len(own_i) else len(near)
    memo_i = np.flatnonzero(near[:first_own] == memo)
    ends = bool(len(near) and near[-1] == own)
    return {"memorised_step": int(steps[memo_i[0]]) if len(memo_i) else None,
            "own_step": int(steps[first_own]) if len(own_i) else None, "ends_own": ends,
            "memorise_then_generalise": bool(len(memo_i)) and ends}


def _angle(u, v) -> float:
    c = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def turn_angles(traj, start: int = 0, min_chord: float = 0.15) -> np.ndarray:
    """Chord-based turn angle (degrees) at each checkpoint >= ``start``; NaN where undefined.

    Args:
      traj: [T, n_concepts] trajectory. start: first checkpoint considered.
      min_chord: the shortest chord that counts as a direction.
    Returns:
      [T] angles in [0, 180], NaN before ``start`` and where either chord does not exist.
    """
    traj = np.asarray(traj, np.float64)
    n = len(traj)
    out = np.full(n, np.nan)
    for i in range(start, n):
        dist = np.linalg.norm(traj - traj[i], axis=-1)  # [T]
        before = [j for j in range(i) if dist[j] >= min_chord]
        after = [k for k in range(i + 1, n) if dist[k] >= min_chord]
        if before and after:
            out[i] = _angle(traj[i] - traj[before[-1]], traj[after[0]] - traj[i])
    return out


def sudden_turn(steps, traj, train_corners, *, min_chord: float = 0.15, tol: float = 0.05,
                min_angle: float = 30.0) -> dict:
    """Detect the sudden turn of a held-out class's trajectory (criterion: module docstring).

    Args:
      steps: [T] checkpoint steps; traj: [T, n_concepts] the class's mean coordinates.
      train_corners: [K, n_concepts] concept-space positions of the training classes.
      min_chord, tol, min_angle: see the module docstring (concept-space units, degrees).
    Returns:
      dict: step (int or None), index, angle (degrees or None), turned (bool), nearest (index
      into train_corners), approach_step, min_distance (closest approach to that corner).
    """
    steps, traj = np.asarray(steps), np.asarray(traj, np.float64)
    keep = np.isfinite(traj).all(-1)  # checkpoints whose samples were all non-finite have no point
    if not keep.all():
        idx = np.flatnonzero(keep)
        if not len(idx):
            return {"step": None, "index": None, "angle": None, "turned": False, "nearest": 0,
                    "approach_step": None, "min_distance": None}
        out = sudden_turn(steps[keep], traj[keep], train_corners, min_chord=min_chord, tol=tol, min_angle=min_angle)
        if out["index"] is not None:
            out["index"] = int(idx[out["index"]])
        return out
    d_all = np.linalg.norm(traj[:, None, :] - np.asarray(train_corners, np.float64)[None], axis=-1)  # [T, K]
    nearest = int(d_all.min(axis=0).argmin())
    d = d_all[:, nearest]
    approach = int(np.nonzero(d <= d.min() + tol)[0][0])
    out = {"step": None, "index": None, "angle": None, "turned": False, "nearest": nearest,
           "approach_step": int(steps[approach]), "min_distance": float(d.min())}
    ang = turn_angles(traj, approach, min_chord)
    if np.all(np.isnan(ang)):
        return out
    i = best = int(np.nanargmax(ang))
    rest = [best]  # the trajectory may rest at the turn: follow it while it stays near
    while True:
        centre = traj[rest].mean(axis=0)
        near = [j for j in (i + 1, i + 2) if j < len(traj) and np.linalg.norm(traj[j] - centre) <= min_chord / 2]
        if not near:
            break
        i = near[0]  # one stray checkpoint (i + 1 away, i + 2 back) does not end a rest
        rest.append(i)
    # the angle is the peak's; the step is where the trajectory leaves the rest that follows it
    return {**out, "step": int(steps[i]), "index": i, "angle": float(ang[best]), "turned": bool(ang[best] >= min_angle)}


# --------------------------------------------------------------------------------------------
# Across a sweep
# --------------------------------------------------------------------------------------------
def separation(member: dict, concept: str):
    """The knob that sets a concept's signal: sep_col / sep_size for images, m_i for vector dim i."""
    if concept in SEPARATION_FIELD:
        return member.get(SEPARATION_FIELD[concept])
    if concept.startswith("dim") and member.get("m") is not None:
        return float(member["m"][int(concept[3:])])
    return None


def summarize_times(members: list[dict], cls: str, concept: str, run_length: float | None = None) -> list[dict]:
    """Learning time of ``concept`` (or "joint") for class ``cls`` vs signal and separation.

    Members that differ only in their seed form one group (``claims.setting_key``: any other swept
    field splits them).

    Args:
      members: analysis member records (with "learning_time", "signal", sweep values).
      run_length: where "never" is censored (default: the latest learning time, else 0).
    Returns:
      one dict per group, ordered by signal: signal (mean over seeds), separation, mean and std
      over seeds with never counted as ``run_length`` (censored), n, n_learned, times (None = never).
    """
    by_setting: dict = {}
    for m in members:
        by_setting.setdefault(claims.setting_key(m), []).append(m)
    if run_length is None:
        run_length = max([t for m in members for t in [m["learning_time"][cls][concept]] if t is not None], default=0.0)
    out = []
    sig_name = concept if concept != "joint" else None
    for ms in by_setting.values():
        times = [m["learning_time"][cls][concept] for m in ms]
        t, cens = stats.censor(times, run_length)
        sig = [m["signal"].get(sig_name) for m in ms] if sig_name else []
        sig = [s for s in sig if s is not None]
        out.append({
            "signal": float(np.mean(sig)) if sig else None,
            "separation": separation(ms[0], concept) if sig_name else None,
            "sep_col": ms[0].get("sep_col"), "sep_size": ms[0].get("sep_size"), "m": ms[0].get("m"),
            "s": ms[0].get("s"), "mask_prob": ms[0].get("mask_prob"),
            "values": claims.swept_values(ms[0]),
            "mean": float(t.mean()), "std": float(t.std()),
            "n": len(times), "n_learned": int((~cens).sum()), "times": times,
        })
    return sorted(out, key=lambda g: (g["signal"] is None, g["signal"] or 0.0, json.dumps(g["m"])))


def memorised_class(spec, cls: int, signal: dict) -> int:
    """The training class a held-out class ``cls`` is expected to pass on its way: ``cls`` with
    its weakest-signal concept (among those where it differs from class 0) at value 0."""
    vals = list(spec.class_values(cls))
    cand = [i for i, v in enumerate(vals) if v != 0]
    k = min(cand, key=lambda i: (signal.get(spec.concepts[i], float("inf")), i))
    vals[k] = 0
    return int(np.ravel_multi_index(vals, spec.values))


def colour_axis(members: list[dict]) -> tuple[str, list]:
    """The member value that colours plots: the first swept separation, else the first other swept
    field with numbers, else the seed."""
    for name in ("sep_col", "sep_size", "m", "s"):
        vals = [json.dumps(m.get(name)) for m in members]
        if len(set(vals)) > 1:
            if name in ("m", "s"):  # a vector: colour by the component that varies most
                arr = np.array([m[name] for m in members], np.float64)
                j = int(np.argmax(arr.std(axis=0)))
                return f"{name}[{j}]", [float(a) for a in arr[:, j]]
            return name, [float(m[name]) for m in members]
    for name in members[0].get("values", {}) if members else ():
        vals = [m.get("values", {}).get(name) for m in members]
        if name != "seed" and len({json.dumps(v) for v in vals}) > 1 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return name, [float(v) for v in vals]
    return "seed", [float(m.get("seed", i)) for i, m in enumerate(members)]
