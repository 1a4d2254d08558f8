"""The CPU demo: a small sweep trained, analysed and elicited in minutes.

The configuration below was chosen by measurement on a 2-core CPU (see README.md) so that the
held-out class's memorise-then-turn trajectory and its earlier emergence under overprompting
are visible within the time budget.
"""
from __future__ import annotations

from pathlib import Path

from jaxconcept import config as C

# Vector concept space, three signal ratios for dim1 (m/s = 10, 20, 40 against 10 for dim0):
# the concept with the stronger signal is learned first; the held-out corner (1, 1) first
# collapses onto a training corner, then turns.
DEMO_SETS = [
    "data.s=[[0.1,0.1],[0.1,0.05],[0.1,0.025]]",
    "seeds=[0,1,2]",
    "model.hidden=[256]",
    "train.steps=6000",
    "train.steps_per_call=250",
    "train.checkpoint_every=1000",
    "eval.n_points=30",
    "eval.n_samples=64",
    "eval.sampler_steps=50",
]


def demo_config(extra_sets=()) -> C.Config:
    return C.override(C.preset("vec2x2"), DEMO_SETS + ["name=\"demo\"", *extra_sets])


def run(out="runs/demo", progress: bool = True, extra_sets=()) -> dict:
    """Train, analyse and elicit the demo sweep into ``out``; returns the paths of the figures.

    ``extra_sets`` are further ``--set`` overrides (the tests use them to shrink the demo).
    """
    from jaxconcept import dynamics, elicit, plots, sweep

    out = Path(out)
    cfg = demo_config(extra_sets)
    print(f"demo: {len(C.members(cfg))} models x {cfg.train.steps} steps -> {out}")
    sweep.train(cfg, out, progress=progress)
    plots.all_figures(dynamics.analyze_run(out), out)
    elicit.elicit_run(out)
    figs = sorted(str(p) for p in (out / "figures").glob("*"))
    print("demo: figures\n  " + "\n  ".join(figs))
    return {"figures": figs}
