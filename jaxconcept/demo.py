"""The CPU demo: a small sweep trained, analysed and elicited in minutes.

The configuration below was chosen by measurement on a 2-core CPU (see README.md) so that the
held-out class's memorise-then-turn trajectory and its earlier emergence under overprompting
are visible within the time budget.
"""
from __future__ import annotations

from pathlib import Path

from jaxconcept import config as C

# Vector concept space (SPEC A6), conditioned on the noisy observed vector. Concept 1's separation
# is small (m1 = 0.2, 0.3, 0.4 against m0 = 1, spread 0.05: signal m/s = 4, 6, 8 against 20), so
# concept 0 is learned first and the held-out corner (1, 1) first heads for the training corner
# (1, 0), then turns toward (1, 1) -- the sooner, the larger m1: its learning time falls as the
# signal grows. Evaluation starts at step 100, before that first move (around step 200-400).
# A moving average of the parameters (ema 0.99) keeps the checkpoint-to-checkpoint jitter below
# the size of the turn; lr 5e-4 and 6,000 steps (8,000 at 3e-4 before), two seeds (three took
# 3 min 31 s) and elicitation at every other checkpoint keep the whole command under three
# minutes on two cores. Each member's numbers do not depend on how many are stacked with it, so
# `--set 'seeds=[2,3,4,5]'` gives more of the seeds' spread. Measured: README.md.
DEMO_SETS = [
    "data.normalize=false",
    "data.m=[[1,0.2],[1,0.3],[1,0.4]]",
    "data.s=[0.05,0.05]",
    "data.cond_mode=\"observed\"",
    "data.cond_noise=0.03",
    "seeds=[0,1]",
    "model.hidden=[256]",
    "train.steps=6000",
    "train.lr=5e-4",
    "train.ema=0.99",
    "train.steps_per_call=250",
    "train.checkpoint_every=1000",
    "eval.first=100",
    "eval.n_points=24",
    "eval.n_samples=64",
    "eval.sampler_steps=50",
]


ELICIT_EVERY = 2  # elicitation at every other checkpoint: half its cost, the curves still resolved


IMAGES_CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "images_cpu.json"


def demo_config(extra_sets=(), images: bool = False) -> C.Config:
    """The vector demo's config, or (``images``) the CPU image study's, experiments/images_cpu.json."""
    if images:
        return C.override(C.load(IMAGES_CONFIG), list(extra_sets))
    return C.override(C.preset("vec2x2"), DEMO_SETS + ["name=\"demo\"", *extra_sets])


def run(out="runs/demo", progress: bool = True, extra_sets=(), images: bool = False) -> dict:
    """Train, analyse and elicit the demo sweep into ``out``; returns the paths of the figures.

    ``images``: the CPU image study (experiments/images_cpu.json, about 38 min on 2 cores) instead
    of the vector demo. ``extra_sets`` are further ``--set`` overrides (the tests use them to shrink
    the demo). A run directory holding the same config resumes.
    """
    from jaxconcept import dynamics, elicit, loop, plots, rundir

    out = rundir.path(out)
    cfg = demo_config(extra_sets, images)
    loop.train(cfg, out, progress=progress)
    plots.all_figures(dynamics.analyze_run(out), out)
    elicit.elicit_run(out, progress=progress, every=ELICIT_EVERY)
    return {"figures": sorted(str(p) for p in (out / "figures").glob("*"))}
