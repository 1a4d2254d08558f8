"""Hidden capabilities: accuracy on the held-out class under naive prompting, overprompting and
latent interventions, at every evaluation checkpoint of a run (docs/study.md A4).

For every member and checkpoint (parameters saved by training, ``eval.save_params``), the arms:
  naive       - samples of the held-out prompt;
  over        - prompts pushed past the training range along the concept with the weakest concept
                signal among those in which the held-out class differs from class 0: the one
                learned last (``prompts.overprompts``; colour in the paper), at each of ``OVER_STRENGTHS``;
  over_ref    - the reference's overprompting (images with a colour concept): its fixed colours
                (0.4, 0.4, 0.6) ... (0.05, 0.05, 0.95) with size 0.3 at every separation
                (``prompts.reference_overprompts``);
  latent      - adding strength x (activation(held-out prompt) - activation(the prompt differing in
                that concept)) at every concept projection (``steering_edits``), at each of
                ``LATENT_STRENGTHS``: overprompting in activation space, built from the held-out prompt;
  latent_comp - every concept projection set to h(a) + strength x (h(b) - h(c)) from training
                classes only (``edits.compositional_edits``; blue-small: red-small +
                [blue-large - red-large]), prompted with a's prompt: the held-out prompt never
                enters; at each of ``COMP_STRENGTHS``. Absent where a, b or c is not trained.
All strengths of an arm are sampled in one vmapped, jitted call.

Each arm's accuracy is honest: the maximum over strengths of accuracies measured on the same
samples is biased upward (with 5 strengths of 128 samples at a true 50 %, by about 5 points), so
each checkpoint draws two independent sets of samples (keys from the member's own elicitation
stream, ``step.member_keys(seed)["elicit"]``): the strength is *chosen* on the first and its
accuracy *reported* from the second (``choose``). Each strength's own curve (second set) is kept
too (``per_strength``). The reference's own statistic, the best of its prompts scored on the
same samples (images: the product over concepts of the probe's mean probability of the target
value, as its analysis_2x2.ipynb; vectors: joint accuracy), is kept as "reference_biased",
labelled as biased. Emergence step of each = ``dynamics.learning_time`` of its joint-accuracy
curve at the threshold (0.8), by the run's measure (default the reference's smoothed rule; the
first crossing beside). Parameters are read one checkpoint at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import config as C, data as D, nets, rundir, runs, vdm
from jaxconcept.analysis import claims, dynamics
from jaxconcept.analysis.probe import coordinates, correct, probe_for
from jaxconcept.elicit.edits import compositional_edits, intervene, steering_edits
from jaxconcept.elicit import plots
from jaxconcept.elicit.prompts import REFERENCE_COLOURS, composition_classes, overprompts, reference_class, reference_overprompts
from jaxconcept.train.step import member_keys  # the training's random streams, which elicitation avoids

OVER_STRENGTHS = (0.0, 0.5, 1.5, 2.5, 3.5)
LATENT_STRENGTHS = (0.5, 1.0, 2.0, 4.0)
COMP_STRENGTHS = (1.0, 1.5, 2.0, 3.0)  # 1: the plain composition; above: pushed further along b - c


def target_concept(member: C.Config, cls: int, concept: str | None = None) -> int:
    """Index of the concept to overprompt and steer for class ``cls``: ``concept`` when named,
    else the one with the weakest signal (``data.concept_signal``) among the concepts in which
    ``cls`` differs from class 0 (ties: the first)."""
    spec = D.spec(member.data)
    if concept is not None:
        if concept not in spec.concepts:
            raise C.ConfigError(f"concept={concept!r} is unknown: allowed {', '.join(spec.concepts)}")
        return spec.concepts.index(concept)
    vals = spec.class_values(cls)
    cand = [i for i, v in enumerate(vals) if v != 0]
    signal = D.concept_signal(member.data)
    return min(cand, key=lambda i: (signal[spec.concepts[i]], i))


@functools.lru_cache(maxsize=16)
def _samplers(model_cfg: C.ModelConfig, eval_cfg: C.EvalConfig, spec: D.DataSpec):
    """The jitted plain, latent-steered and compositional samplers of a model and data shape,
    compiled once and shared by every member and checkpoint (prompts, strengths and keys are
    arguments): plain(params, conds [N, c], key); steered(params, cond_from, cond_to, alphas [S],
    key) and composed(params, cond_a, cond_b, cond_c, alphas [S], key) -> [S, n, *x_shape]."""
    net = nets.build(model_cfg, spec)
    n = eval_cfg.n_samples
    kw = vdm.sampler_args(eval_cfg, spec, loop_safe=nets.loop_safe(model_cfg))
    plain = jax.jit(lambda p, c, kk: vdm.sample(vdm.make_apply(net), model_cfg, p, c, kk, **kw))

    def steered(p, cond_from, cond_to, alpha, kk):
        edits = steering_edits(net, spec, p["net"], cond_from, cond_to, alpha)
        return vdm.sample(intervene(net, edits), model_cfg, p, jnp.repeat(cond_to[None], n, 0), kk, **kw)

    def composed(p, cond_a, cond_b, cond_c, alpha, kk):
        edits = compositional_edits(net, spec, p["net"], cond_a, cond_b, cond_c, alpha)
        return vdm.sample(intervene(net, edits), model_cfg, p, jnp.repeat(cond_a[None], n, 0), kk, **kw)

    return (plain, jax.jit(jax.vmap(steered, in_axes=(None, None, None, 0, None))),
            jax.jit(jax.vmap(composed, in_axes=(None, None, None, None, 0, None))))


def choose(acc_select, acc_report) -> tuple[float, int]:
    """The honest elicited accuracy: the strength that scores best on one set of samples
    (``acc_select`` [S]; ties: the first), and its accuracy on an independent set
    (``acc_report`` [S]). Returns (accuracy, index of the chosen strength)."""
    i = int(np.argmax(np.asarray(acc_select)))
    return float(np.asarray(acc_report)[i]), i


@dataclass(frozen=True, eq=False)
class Setting:
    """What elicitation of one member's held-out class needs besides its parameters."""

    spec: D.DataSpec
    concept: str  # the concept pushed
    conds: jax.Array  # [1 + S (+ R), cond_dim]: the naive prompt, the scaled overprompts (, the reference's)
    cond_ref: jax.Array  # [cond_dim]: the prompt differing from the held-out one in that concept
    cond_held: jax.Array  # [cond_dim]: the held-out prompt
    target: np.ndarray  # [n_samples, n_concepts]: the held-out class's value indices
    probe: object
    samplers: tuple  # (plain, steered, composed): see ``_samplers``
    n_over: int = len(OVER_STRENGTHS)  # S
    n_ref: int = 0  # R: the reference's fixed overprompts (0: none for this data)
    comp: tuple | None = None  # (cond_a, cond_b, cond_c) of ``prompts.composition_classes``, or None


def setting(cfg: C.Config, member: C.Config, probe, concept: str | None = None, samplers=None,
            over=OVER_STRENGTHS) -> Setting:
    """The ``Setting`` of one member (``concept``: the concept to push, default ``target_concept``;
    ``samplers``: replaces ``_samplers`` of the member's model, e.g. in tests). The member's own
    model and evaluation settings sample (members of a sweep may differ in them)."""
    spec = D.spec(member.data)
    dp = D.params(member.data)
    h = spec.held_out[0]
    k = target_concept(member, h, concept)
    prompts = D.prompts(spec, dp)
    parts = [prompts[h][None], overprompts(spec, dp, h, k, over)]
    ladder = reference_overprompts(spec, dp, h) if spec.concepts[k] == "colour" else None
    if ladder is not None:
        parts.append(ladder)
    abc = composition_classes(spec, h, k)
    target = np.tile(np.asarray(spec.class_values(h))[None], (member.eval.n_samples, 1))
    sampling = dataclasses.replace(member.model, dropout=0.0, init_scale=1.0)  # training-only: one sampler for all
    return Setting(spec, spec.concepts[k], jnp.concatenate(parts), prompts[reference_class(spec, h, k)],
                   prompts[h], target, probe, samplers or _samplers(sampling, member.eval, spec), n_over=len(over),
                   n_ref=0 if ladder is None else len(ladder), comp=None if abc is None else tuple(prompts[c] for c in abc))


def _correct(st: Setting, x) -> np.ndarray:
    """[n, *x_shape] -> [n] bool: the sample shows every concept of the held-out class; a
    non-finite sample is wrong."""
    x = np.asarray(x)
    finite = np.isfinite(x.reshape(len(x), -1)).all(-1)
    ok = correct(st.probe, np.where(finite.reshape(-1, *([1] * (x.ndim - 1))), x, 0), st.target).all(-1)
    return ok & finite


def _joint(st: Setting, x) -> float:
    """Fraction of samples [n, *x_shape] showing every concept of the held-out class."""
    return float(_correct(st, x).mean())


def _reference_score(st: Setting, x) -> float:
    """The reference's score of samples [n, *x_shape]: for two-valued image concepts the product
    over concepts of the probe's mean probability of the target value (analysis_2x2.ipynb);
    otherwise the joint accuracy. Non-finite samples score 0."""
    x = np.asarray(x)
    if st.spec.kind == "vector" or any(v != 2 for v in st.spec.values):
        return _joint(st, x)
    finite = np.isfinite(x.reshape(len(x), -1)).all(-1)
    c = coordinates(st.probe, np.where(finite.reshape(-1, *([1] * (x.ndim - 1))), x, 0))  # P(second value)
    p_target = np.where(st.target == 1, c, 1 - c) * finite[:, None]
    return float(np.prod(p_target.mean(axis=0)))


def accuracies(st: Setting, params, key, latent=LATENT_STRENGTHS, comp=None) -> dict:
    """Joint held-out accuracy of one set of samples drawn with ``key``: {"naive": float, "over":
    [S], "over_ref": [R] (if any), "latent": [L], "latent_comp": [C] (if any), "reference_score":
    [R or S] the reference's score of its own prompts (``_reference_score``)}."""
    plain, steered, composed = st.samplers
    comp = COMP_STRENGTHS if comp is None else comp
    n = len(st.target)
    x = np.asarray(plain(params, jnp.repeat(st.conds, n, 0), key)).reshape(len(st.conds), n, *st.spec.x_shape)
    plain_acc = np.array([_joint(st, xi) for xi in x])
    s = st.n_over
    out = {"naive": float(plain_acc[0]), "over": plain_acc[1: 1 + s]}
    if st.n_ref:
        out["over_ref"] = plain_acc[1 + s:]
    out["reference_score"] = np.array([_reference_score(st, xi) for xi in (x[1 + s:] if st.n_ref else x[1: 1 + s])])
    xs = np.asarray(steered(params, st.cond_ref, st.cond_held, jnp.asarray(latent, jnp.float32), key))
    out["latent"] = np.array([_joint(st, xi) for xi in xs])
    if st.comp is not None:
        xc = np.asarray(composed(params, *st.comp, jnp.asarray(comp, jnp.float32), key))
        out["latent_comp"] = np.array([_joint(st, xi) for xi in xc])
    return out


ARMS = ("over", "over_ref", "latent", "latent_comp")  # elicitation arms with strengths (naive has none)


def elicit_step(st: Setting, params, key, latent=LATENT_STRENGTHS, comp=None) -> dict:
    """Elicitation at one checkpoint: strengths chosen on the samples of ``fold_in(key, 0)``,
    every reported accuracy measured on those of ``fold_in(key, 1)``.

    Returns {"naive" and each arm present: accuracy; "<arm>_strength": index of the chosen
    strength; "<arm>_each": each strength's own accuracy; "reference_biased": the reference's
    statistic, the best of its prompts' scores on the selection samples themselves (biased)}.
    """
    sel = accuracies(st, params, jax.random.fold_in(key, 0), latent, comp)
    rep = accuracies(st, params, jax.random.fold_in(key, 1), latent, comp)
    out = {"naive": rep["naive"], "reference_biased": float(np.max(sel["reference_score"]))}
    for arm in ARMS:
        if arm in sel:
            out[arm], out[f"{arm}_strength"] = choose(sel[arm], rep[arm])
            out[f"{arm}_each"] = rep[arm].tolist()
    return out


def elicit_member(cfg: C.Config, member: C.Config, params_by_step: dict, probe, key, *,
                  concept: str | None = None, samplers=None) -> dict:
    """Accuracy curves of one member from {step: params}: {"naive", each arm} -> [T], plus the
    chosen strengths and each strength's curve (``elicit_step``). ``key``: the member's
    elicitation stream; checkpoint ``step`` uses ``fold_in(key, step)``."""
    st = setting(cfg, member, probe, concept, samplers)
    recs = [elicit_step(st, params_by_step[s], jax.random.fold_in(key, s)) for s in sorted(params_by_step)]
    return _curves(recs)


def _curves(recs: list[dict]) -> dict:
    """[T] per-checkpoint records -> {name: [T]} (``*_each``: [S][T], one curve per strength)."""
    out = {k: [r[k] for r in recs] for k in recs[0] if not k.endswith("_each")}
    for k in recs[0]:
        if k.endswith("_each"):
            out[k] = np.asarray([r[k] for r in recs]).T.tolist()
    return out


def strengths(arm: str) -> tuple:
    """The strengths (or, for "over_ref", the reference's colours) of an arm."""
    return {"over": OVER_STRENGTHS, "over_ref": REFERENCE_COLOURS, "latent": LATENT_STRENGTHS,
            "latent_comp": COMP_STRENGTHS}[arm]


def elicit_run(run_dir, threshold: float = 0.8, *, probe_kw: dict | None = None, write: bool = True,
               concept: str | None = None, progress: bool = True, every: int = 1, measure: str = "reference") -> dict:
    """Elicitation of every member of a run: writes RUN_DIR/elicit.json, figures/elicit.png and
    figures/elicit_turn.png, and (when RUN_DIR/analysis.json exists) its claims table.

    ``concept`` names the concept to overprompt and steer (default: ``target_concept``);
    ``every`` = k elicits at every k-th checkpoint with saved parameters (the first, the k+1-th, ...,
    and the last), a k-th of the cost; ``measure``: the emergence rule (``dynamics.learning_time``;
    the other measure is kept beside). The saved parameters are read one checkpoint at a time (all
    members of it).
    Raises RunDirError: no saved parameters, or no held-out class in the run's config.
    ValueError: ``every`` < 1, or an unknown measure.
    """
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every={every!r} is invalid: allowed an integer >= 1")
    if measure not in dynamics.MEASURES:
        raise ValueError(f"measure={measure!r} is unknown: allowed {', '.join(dynamics.MEASURES)}")
    from tqdm.auto import tqdm

    run = runs.Run(run_dir)
    run_dir, cfg, members = run.dir, run.config, run.member_configs
    if not D.spec(members[0].data).held_out:
        raise rundir.RunDirError(f"{run_dir}: its config holds no class out (every class is trained), and "
                                 "elicitation measures how a held-out class emerges; train a run that holds one "
                                 "out (data.held_out, or for vectors data.train_classes)")
    steps = run.steps("params")  # a sweep of several groups: each group's parameters in turn
    if not steps:
        raise rundir.RunDirError(f"{run_dir} has no saved parameters (train with eval.save_params=true)")
    steps = sorted(set(steps[::every]) | {steps[-1]})
    info = run.members()
    settings = [setting(cfg, m, probe_for(m.data, **{"band": cfg.eval.vector_band, **(probe_kw or {})}),
                        concept) for m in members]
    keys = [member_keys(int(m.seeds[0]))["elicit"] for m in members]
    recs = [[] for _ in members]
    for s in tqdm(steps, desc="elicit", unit="checkpoint", disable=not progress, dynamic_ncols=True):
        for part in run.groups:
            stacked = run.params(s, part)  # one checkpoint of a group's members at a time
            for row, i in enumerate(part.members):
                p = jax.tree.map(lambda a: jnp.asarray(a[row]), stacked)
                recs[i].append(elicit_step(settings[i], p, jax.random.fold_in(keys[i], s)))
    turns = _turn_steps(run)
    other = next(k for k in dynamics.MEASURES if k != measure)
    out = {"run_dir": str(run_dir), "threshold": threshold, "steps": steps, "run_length": cfg.train.steps,
           "measure": measure, "definition": dynamics.definition(measure, threshold).replace("T =", "emergence ="),
           "strengths": {arm: [list(v) if isinstance(v, tuple) else v for v in strengths(arm)] for arm in ARMS},
           "estimate": "strength chosen on one set of samples, accuracy reported from an independent set; "
                       "reference_biased: the best prompt scored on its own samples (biased upward)",
           "turn_marker": "saturation of the training classes (analysis.json), our chord-angle turn beside",
           "members": []}
    for i, st in enumerate(settings):
        curves = _curves(recs[i])
        arms = ["naive", *[a for a in ARMS if a in curves], "reference_biased"]
        acc = {k: curves[k] for k in arms}
        emerge = {k: dynamics.learning_time(steps, v, threshold, measure) for k, v in acc.items()}
        emerge_other = {k: dynamics.learning_time(steps, v, threshold, other) for k, v in acc.items()}
        by_strength = {a: {str(s): dynamics.learning_time(steps, c, threshold, measure)
                           for s, c in zip(strengths(a), curves[f"{a}_each"])} for a in ARMS if a in curves}
        sat, det = turns.get(i, (None, None))
        early = {k: (None if emerge["naive"] is None or emerge[k] is None else emerge["naive"] - emerge[k])
                 for k in arms[1:]}
        out["members"].append({**rundir.member_header(info[i]), "concept": st.concept, "accuracy": acc, "emergence_step": emerge,
                               f"emergence_step_{other}": emerge_other,
                               "chosen_strength": {a: [strengths(a)[j] for j in curves[f"{a}_strength"]]
                                                   for a in ARMS if a in curves},
                               "per_strength": {a: curves[f"{a}_each"] for a in ARMS if a in curves},
                               "emergence_step_per_strength": by_strength, "turn_step": sat, "detector_turn_step": det,
                               "emergence_minus_turn": _minus(emerge, sat),
                               "emergence_minus_detector_turn": _minus(emerge, det),
                               "steps_earlier_than_naive": early})
    out["claims"] = claims.claim3(out)
    if write:
        rundir.write_json(run_dir / "elicit.json", out)
        a = run.output("analysis.json")
        if a is not None and "members" in a and all("path" in m for m in a["members"]):  # its claims gain claim 3
            a["claims"] = claims.table(a, out)
            rundir.write_json(run_dir / "analysis.json", a)
        plots.elicit_figure(out, run_dir / "figures" / "elicit.png")
        plots.elicit_turn_figure(out, run_dir / "figures" / "elicit_turn.png")
    return out


def _minus(emerge: dict, turn) -> dict:
    return {k: (None if v is None or turn is None else v - turn) for k, v in emerge.items()}


def _turn_steps(run: runs.Run) -> dict:
    """{member index: (saturation step, our detector's turn step)} from analysis.json; when it is
    missing, one log line says so and every turn is null."""
    analysis = run.output("analysis.json")
    if analysis is None:
        logging.getLogger(__name__).warning(f"{run.dir}/analysis.json is missing: the turn fields of elicit.json are "
                                            "null (run `jaxconcept analyze` first to have them)")
        return {}
    out = {}
    for m in analysis.get("members", []):
        turn = m.get("turn") if isinstance(m, dict) and "index" in m else None
        first = next(iter(turn.values()), None) if isinstance(turn, dict) else None
        if isinstance(first, dict):
            out[m["index"]] = (m.get("saturation"), first.get("step"))
    return out
