"""The concept-space analysis of a run: the measures of ``dynamics`` applied to every member and
checkpoint of a run directory (read through ``runs.Run``), written to RUN_DIR/analysis.json
(``analyze_run``), and the samples its figures show (``shown_samples``)."""
from __future__ import annotations

import numpy as np

from jaxconcept.analysis import claims
from jaxconcept import config as C
from jaxconcept import data as D
from jaxconcept.analysis.probe import cache_key, class_value_table, coordinates, probe_for
from jaxconcept import rundir, runs
from jaxconcept.analysis.dynamics import (MEASURES, SATURATED, SIGMA_TURN, THRESHOLDS, class_accuracy, class_coordinates,
                                 colour_axis, corner_path, corners, definition, learning_time, memorised_class,
                                 saturation, sudden_turn, summarize_times, finite_samples)


def _round(a, nd=4):
    return np.round(np.asarray(a, np.float64), nd).tolist()


def analyze_run(run_dir, threshold: float | None = None, *, measure: str = "reference", probe_kw: dict | None = None,
                turn_kw: dict | None = None, write: bool = True) -> dict:
    """Concept-space analysis of every member and checkpoint of a run; writes analysis.json.

    Args:
      run_dir: a run directory (rundir.py layout) with at least one samples/step_*.npz.
      threshold: accuracy that counts as learned by ``measure`` (default: the measure's, ``THRESHOLDS``).
      measure: the learning-time measure of "learning_time" and the figures, "reference" (default) or
        "first_crossing"; the other measure (at its own default threshold) is kept beside it.
      probe_kw: keyword arguments for ``probe.probe_for`` (e.g. k, max_steps).
      turn_kw: keyword arguments for ``sudden_turn``.
      write: write RUN_DIR/analysis.json.
    Returns:
      The analysis dict: run-level description ("steps", "run_length", "measure", "definition",
      "concepts", "class_names", ...), "probes" (test accuracy of each probe), "members" (per
      member: config values, signals, probe, "learning_time" {class: {concept|"joint": step|None}}
      by ``measure`` and "learning_time_<other measure>" beside it, "turn" {held-out class: our
      detector}, "saturation" (step or None) and "saturation_msd" [T], "path" {held-out class:
      ``corner_path`` and "memo"}, "accuracy" {class: {concept|"joint": [T]}}, "coords" {class:
      [T][n_concepts]}), "summary" (learning time vs signal/separation per class and concept) and
      "claims" (``claims.table``; claim 3 when RUN_DIR/elicit.json is there).
    Raises:
      rundir.RunDirError: not a run directory, or no samples yet. probe.ProbeError: unreliable probe.
      ValueError: an unknown measure.
    """
    run = runs.Run(run_dir)
    run_dir, cfg, parts, member_cfgs = run.dir, run.config, run.groups, run.member_configs
    steps = run.steps("samples")
    if not steps:
        raise rundir.RunDirError(f"{run_dir} has no samples (samples/step_*.npz): train it first, "
                                 "or wait for the first evaluation point")
    members = run.members()
    frozen_at = _frozen_at(run.metrics(), len(members))
    spec = D.spec(member_cfgs[0].data)
    table = class_value_table(spec)
    names = spec.class_names
    train_corners = corners(spec.values, table)[list(spec.train_classes)]

    probes: dict = {}
    member_probe = []
    for mc in member_cfgs:
        key = cache_key(mc.data)
        if key not in probes:
            probes[key] = probe_for(mc.data, **{"band": cfg.eval.vector_band, **(probe_kw or {})})
        member_probe.append(key)

    n_m, n_t = len(members), len(steps)
    coords = np.zeros((n_m, n_t, spec.n_classes, len(spec.concepts)))
    acc = np.zeros((n_m, n_t, spec.n_classes, len(spec.concepts)))
    joint = np.zeros((n_m, n_t, spec.n_classes))
    nan_samples = np.zeros(n_m, int)
    for t, step in enumerate(steps):
        for part in parts:
            samples = run.samples(step, part)  # [M_group, n_classes, n_samples, *x_shape]
            if samples.shape[0] != len(part.members) or samples.shape[1] != spec.n_classes:
                raise rundir.RunDirError(f"{part.dir}: samples at step {step} have shape {samples.shape}, expected "
                                         f"[{len(part.members)}, {spec.n_classes}, n_samples, ...]")
            for row, i in enumerate(part.members):
                nan_samples[i] += int((~finite_samples(samples[row])).sum())
                pr = probes[member_probe[i]]
                coords[i, t] = class_coordinates(pr, samples[row])[1]
                acc[i, t], joint[i, t] = class_accuracy(pr, samples[row], table)

    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is unknown: allowed {', '.join(MEASURES)}")
    threshold = THRESHOLDS[measure] if threshold is None else threshold
    other = next(k for k in MEASURES if k != measure)
    all_corners = corners(spec.values, table)
    records = []
    for i, m in enumerate(members):
        lt, lt_other, turns, paths, accd, crd = {}, {}, {}, {}, {}, {}
        for c, name in enumerate(names):
            curves = {con: acc[i, :, c, j] for j, con in enumerate(spec.concepts)}
            curves["joint"] = joint[i, :, c]
            lt[name] = {k: learning_time(steps, v, threshold, measure) for k, v in curves.items()}
            lt_other[name] = {k: learning_time(steps, v, None, other) for k, v in curves.items()}
            accd[name] = {k: _round(v) for k, v in curves.items()}
            crd[name] = _round(coords[i, :, c])
            if c in spec.held_out:
                tr = sudden_turn(steps, coords[i, :, c], train_corners, **(turn_kw or {}))
                tr["nearest"] = names[spec.train_classes[tr["nearest"]]]
                turns[name] = tr
                memo = memorised_class(spec, c, m.get("signal", {}))
                paths[name] = {**corner_path(steps, coords[i, :, c], all_corners, c, memo), "memo": names[memo]}
        sat, msd = saturation(steps, coords[i][:, list(spec.train_classes)].transpose(1, 0, 2), train_corners)
        records.append({**rundir.member_header(m), "signal": m.get("signal", {}), "probe": member_probe[i], "frozen_at": frozen_at[i],
                        "nan_samples": int(nan_samples[i]), "learning_time": lt, f"learning_time_{other}": lt_other,
                        "turn": turns, "saturation": sat, "saturation_msd": _round(msd), "path": paths,
                        "accuracy": accd, "coords": crd})

    run_length = cfg.train.steps
    summary = {name: {con: summarize_times(records, name, con, run_length) for con in (*spec.concepts, "joint")}
               for name in names}
    axis, axis_values = colour_axis(records)
    out = {
        "run_dir": str(run_dir), "name": cfg.name, "kind": spec.kind, "threshold": threshold, "steps": steps,
        "run_length": run_length, "measure": measure, "definition": definition(measure, threshold),
        "other_measure": {"measure": other, "definition": definition(other, THRESHOLDS[other])},
        "turn_marker": f"saturation: first checkpoint at which the training classes' mean squared distance to their "
                       f"corners (trajectories smoothed by a Gaussian of sigma {SIGMA_TURN} checkpoints) is < {SATURATED}",
        "swept": C.swept_fields(cfg), "groups": len(parts),
        "concepts": list(spec.concepts), "values": list(spec.values),
        "value_names": [list(v) for v in spec.value_names], "class_names": list(names),
        "train_classes": list(spec.train_classes), "held_out": list(spec.held_out),
        "corners": _round(all_corners), "colour_by": {"field": axis, "values": axis_values},
        "probes": {k: {"kind": p.kind, "min_accuracy": float(np.min(p.accuracy)), "accuracy": _round(p.accuracy),
                       # the worst class and concept on draws at the corners of the class boxes (images)
                       "corner_min_accuracy": None if p.corner_accuracy is None else float(np.min(p.corner_accuracy)),
                       "corner_accuracy": None if p.corner_accuracy is None else _round(p.corner_accuracy)}
                   for k, p in probes.items()},
        "members": records, "summary": summary,
    }
    out["claims"] = claims.table(out, elicitation(run))
    if write:
        rundir.write_json(run_dir / "analysis.json", out)
    return out


def shown_samples(run_dir, analysis: dict, member: int = 0, max_frames: int = 40, probe_kw: dict | None = None) -> dict:
    """What the figures show of one member's samples (``plots.all_figures``): {"member",
    "frames": indices into analysis["steps"] (at most ``max_frames``, evenly spread, the last
    included), "samples": per frame [n_classes, n, ...]}: images, the first 6 per class; vectors,
    the first 256 per class as concept coordinates [n_classes, 256, n_concepts] (the member's exact
    probe, ``probe_kw`` as for ``analyze_run``)."""
    run = runs.Run(run_dir)
    n_t = len(analysis["steps"])
    frames = sorted(set(np.linspace(0, n_t - 1, min(max_frames, n_t)).round().astype(int).tolist()))
    shown = [run.member_samples(analysis["steps"][t], member)[:, :6 if analysis["kind"] != "vector" else 256]
             for t in frames]
    if analysis["kind"] == "vector":
        probe = probe_for(run.member_configs[member].data, **{"band": run.config.eval.vector_band, **(probe_kw or {})})
        shown = [coordinates(probe, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1) for x in shown]
    return {"member": member, "frames": frames, "samples": shown}


def elicitation(run: runs.Run) -> dict | None:
    """RUN_DIR/elicit.json when it exists and holds the arms and run length of today's format, else None."""
    out = run.output("elicit.json")
    return out if out is not None and "run_length" in out else None


def _frozen_at(metrics: list[dict], n: int) -> list:
    """Per member, the first logged step at which training had frozen it (diverged), or None."""
    out = [None] * n
    for r in metrics:
        for i, f in enumerate(r.get("frozen", [])[:n]):
            if f and out[i] is None:
                out[i] = r["step"]
    return out
