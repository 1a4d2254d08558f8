"""Figures of elicitation, from the dict ``measure.elicit_run`` writes (elicit.json):

    elicit.png            held-out accuracy of every elicitation arm vs step, saturation dotted
    elicit_turn.png       each arm's emergence step minus the saturation step, per member
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxconcept.analysis import claims
from jaxconcept.analysis.plots import save


ARM_STYLES = {"naive": ("k", "naive prompt"), "over_ref": ("tab:green", "overprompting (reference's colours)"),
              "over": ("tab:blue", "overprompting (scaled)"), "latent": ("tab:red", "latent (held-out prompt)"),
              "latent_comp": ("tab:purple", "latent (compositional)")}


def _elicit_groups(result: dict) -> dict:
    """{setting label: its members} (``claims.setting_key``: members differing only in their seed)."""
    out: dict = {}
    for m in result["members"]:
        out.setdefault(claims.setting_key(m), []).append(m)
    return {claims.setting_label(ms[0]): ms for ms in out.values()}


def elicit_figure(result: dict, path) -> Path:
    """Held-out accuracy vs step of every arm (naive, each overprompting, each latent
    intervention); members grouped by their sweep setting, mean line with the seeds' spread
    (min-max band); the median saturation step (the reference's turn marker) dotted."""
    steps = np.asarray(result["steps"])
    groups = _elicit_groups(result)
    fig = Figure(figsize=(4.2 * len(groups), 3.4))
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)
    for ax, (key, ms) in zip(axes[0], groups.items()):
        for kind, (colour, label) in ARM_STYLES.items():
            if kind not in ms[0]["accuracy"]:
                continue
            a = np.asarray([m["accuracy"][kind] for m in ms])
            ax.plot(steps, a.mean(0), color=colour, label=label)
            ax.fill_between(steps, a.min(0), a.max(0), color=colour, alpha=0.12)
        turns = [m["turn_step"] for m in ms if m.get("turn_step") is not None]
        if turns:
            ax.axvline(float(np.median(turns)), color="C3", ls=":", lw=1)
        ax.axhline(result["threshold"], ls=":", color="grey")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("held-out accuracy (honest)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(result.get("definition", ""), fontsize=7)
    return save(fig, path)


def elicit_turn_figure(result: dict, path) -> Path:
    """Each arm's emergence step minus the member's saturation step (the reference's turn
    marker), one dot per member coloured by setting: left of 0 = before the turn; members that
    never emerge or never saturate are left out (counted in the labels)."""
    groups = _elicit_groups(result)
    arms = [a for a in ARM_STYLES if a in result["members"][0]["emergence_step"]]
    fig = Figure(figsize=(6.4, 0.5 + 0.55 * len(arms)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    for g, (key, ms) in enumerate(groups.items()):
        colour = cmap(g / max(1, len(groups) - 1))
        for y, arm in enumerate(arms):
            v = [m["emergence_minus_turn"].get(arm) for m in ms]
            v = [x for x in v if x is not None]
            jitter = (g - (len(groups) - 1) / 2) * 0.08
            ax.plot(v, np.full(len(v), y + jitter), "o", ms=4, color=colour, label=key if y == 0 else None)
    missing = [sum(m["emergence_minus_turn"].get(a) is None for m in result["members"]) for a in arms]
    ax.set_yticks(range(len(arms)))
    ax.set_yticklabels([f"{ARM_STYLES[a][1]} ({k} n/a)" for a, k in zip(arms, missing)], fontsize=7)
    ax.axvline(0, color="C3", ls=":", lw=1)
    ax.set_xlabel("emergence step - saturation step (the turn)")
    ax.legend(fontsize=6, loc="best")
    return save(fig, path)
