"""The CPU demo: a small sweep trained, analysed and elicited in minutes.

Its configuration is experiments/demo.json, chosen by measurement on a 2-core CPU (docs/demo.md)
so that the held-out class's memorise-then-turn trajectory and its earlier emergence under
overprompting are visible within the time budget.
"""
from __future__ import annotations

from pathlib import Path

from jaxconcept import config as C

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
DEMO_CONFIG = EXPERIMENTS / "demo.json"  # the vector demo; its "_doc" says why each setting
IMAGES_CONFIG = EXPERIMENTS / "images_cpu.json"  # `demo --images`: the CPU image study
ELICIT_EVERY = 2  # elicitation at every other checkpoint: half its cost, the curves still resolved


def demo_config(extra_sets=(), images: bool = False) -> C.Config:
    """The vector demo's config (experiments/demo.json), or (``images``) the CPU image study's
    (experiments/images_cpu.json), with ``extra_sets`` overrides on top."""
    return C.override(C.load(IMAGES_CONFIG if images else DEMO_CONFIG), list(extra_sets))


def run(out="runs/demo", progress: bool = True, extra_sets=(), images: bool = False) -> dict:
    """Train, analyse and elicit the demo sweep into ``out``; returns the paths of the figures.

    ``images``: the CPU image study (experiments/images_cpu.json, about 38 min on 2 cores) instead
    of the vector demo. ``extra_sets`` are further ``--set`` overrides (the tests use them to shrink
    the demo). A run directory holding the same config resumes.
    """
    from jaxconcept.analysis import analyze, plots
    from jaxconcept.elicit import measure
    from jaxconcept.train import loop
    from jaxconcept import rundir

    out = rundir.path(out)
    cfg = demo_config(extra_sets, images)
    loop.train(cfg, out, progress=progress)
    analysis = analyze.analyze_run(out)
    plots.all_figures(analysis, analyze.shown_samples(out, analysis), out / "figures")
    measure.elicit_run(out, progress=progress, every=ELICIT_EVERY)
    return {"figures": sorted(str(p) for p in (out / "figures").glob("*"))}
