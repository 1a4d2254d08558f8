"""Statistics across seeds: censoring, rank correlation, bootstrap intervals (pure numpy).

A learning time or an emergence step that never happened within a run is *censored*: it is
recorded as the run's length and flagged, never dropped (dropping the members that never learn
would bias every mean toward the fast ones). Intervals are percentile bootstrap intervals over
the seeds (members), drawn from a ``numpy.random.Generator`` seeded by the caller.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 10_000  # bootstrap resamples
LEVEL = 0.95  # interval level


def censor(values, run_length: float) -> tuple[np.ndarray, np.ndarray]:
    """Steps with None (never) replaced by ``run_length``.

    Args:
      values: sequence of float or None. run_length: the run's last step.
    Returns:
      (float64 [N] steps, bool [N] censored flags).
    """
    flags = np.array([v is None for v in values], bool)
    return np.array([run_length if v is None else float(v) for v in values], np.float64), flags


def ranks(x) -> np.ndarray:
    """Ranks 1..N of ``x`` [N], ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average over ties
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float | None:
    """Spearman's rank correlation of ``x`` and ``y`` [N]: Pearson's r of their (tie-averaged)
    ranks (Spearman 1904; as scipy.stats.spearmanr). None when N < 2 or either is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return None
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return None if den == 0 else float((rx * ry).sum() / den)


def bootstrap_mean(values, seed: int = 0, n_boot: int = N_BOOT, level: float = LEVEL) -> dict:
    """Mean of ``values`` [N] with a percentile bootstrap interval (Efron 1979): the means of
    ``n_boot`` resamples of N values drawn with replacement; the interval is their
    (1 - level)/2 and (1 + level)/2 quantiles.

    Returns:
      {"mean", "low", "high", "n"}; low = high = mean for N = 1, all None for N = 0.
    """
    v = np.asarray(values, np.float64)
    if not len(v):
        return {"mean": None, "low": None, "high": None, "n": 0}
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(v.mean()), "low": float(lo), "high": float(hi), "n": int(len(v))}


def verdict(low, mean) -> str:
    """The pre-registered rule for an effect that should be positive (experiments/prereg_*.json):
    "reproduced" when the interval lies above 0, "partly" when only the mean does, else "not"."""
    if mean is None:
        return "not"
    return "reproduced" if low is not None and low > 0 else "partly" if mean > 0 else "not"
