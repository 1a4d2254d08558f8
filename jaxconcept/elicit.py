"""Hidden capabilities: accuracy on the held-out class under naive prompting, overprompting and
latent interventions, at every evaluation checkpoint of a run (SPEC A4).

For every member and checkpoint (parameters saved by training, ``eval.save_params``):
  naive   - samples of the held-out prompt;
  over    - prompts pushed past the training range along the concept with the weakest concept
            signal among those in which the held-out class differs from class 0: the one learned
            last (``overprompts``; colour in the paper), at each of ``OVER_STRENGTHS``;
  latent  - adding strength x (activation(held-out prompt) - activation(the prompt differing in
            that concept)) at every concept projection (``steering_edits``), at each of
            ``LATENT_STRENGTHS``; all strengths sampled in one vmapped, jitted call.

The elicited accuracy is honest: the maximum over strengths of accuracies measured on the same
samples is biased upward (with 5 strengths of 128 samples at a true 50 %, by about 5 points), so
each checkpoint draws two independent sets of samples (keys from the member's own elicitation
stream, ``step.member_keys(seed)["elicit"]``): the strength is *chosen* on the first and its
accuracy *reported* from the second (``choose``). Each strength's own curve (second set) is kept
too (``per_strength``). Emergence step of each = first step with joint accuracy >= threshold
(``dynamics.learning_time``). Parameters are read one checkpoint at a time.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import config as C, data as D, diffusion, dynamics, groups, interventions as I, nets, probe as P, rundir

OVER_STRENGTHS = (0.0, 0.5, 1.5, 2.5, 3.5)
LATENT_STRENGTHS = (0.5, 1.0, 2.0, 4.0)


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
    """The jitted plain and latent-steered samplers of a model and data shape, compiled once and
    shared by every member and checkpoint (prompts, strengths and keys are arguments)."""
    net = nets.build(model_cfg, spec)
    n = eval_cfg.n_samples
    kw = dict(x_shape=spec.x_shape, n_steps=eval_cfg.sampler_steps, w_cfg=eval_cfg.w_cfg, null_cond=D.null_cond(spec),
              output=eval_cfg.sampler_output, loop_safe=nets.loop_safe(model_cfg))
    plain = jax.jit(lambda p, c, kk: diffusion.sample(diffusion.make_apply(net), model_cfg, p, c, kk, **kw))

    def steered(p, cond_from, cond_to, alpha, kk):
        edits = I.steering_edits(net, spec, p["net"], cond_from, cond_to, alpha)
        return diffusion.sample(I.intervene(net, edits), model_cfg, p, jnp.repeat(cond_to[None], n, 0), kk, **kw)

    return plain, jax.jit(jax.vmap(steered, in_axes=(None, None, None, 0, None)))


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
    conds: jax.Array  # [1 + S, cond_dim]: the naive prompt, then the overprompts
    cond_ref: jax.Array  # [cond_dim]: the prompt differing from the held-out one in that concept
    cond_held: jax.Array  # [cond_dim]: the held-out prompt
    target: np.ndarray  # [n_samples, n_concepts]: the held-out class's value indices
    probe: object
    samplers: tuple  # (plain, steered): see ``_samplers``


def setting(cfg: C.Config, member: C.Config, probe, concept: str | None = None, samplers=None,
            over=OVER_STRENGTHS) -> Setting:
    """The ``Setting`` of one member (``concept``: the concept to push, default ``target_concept``;
    ``samplers``: replaces ``_samplers`` of the member's model, e.g. in tests). The member's own
    model and evaluation settings sample (members of a sweep may differ in them)."""
    spec = D.spec(member.data)
    dp = D.params(member.data)
    h = spec.held_out[0]
    k = target_concept(member, h, concept)
    vals = list(spec.class_values(h))
    ref_vals = list(vals)
    ref_vals[k] = 0
    prompts = D.prompts(spec, dp)
    conds = jnp.concatenate([prompts[h][None], I.overprompts(spec, dp, h, k, over)])  # [1 + S, cond_dim]
    target = np.tile(np.asarray(vals)[None], (member.eval.n_samples, 1))
    sampling = dataclasses.replace(member.model, dropout=0.0, init_scale=1.0)  # training-only: one sampler for all
    return Setting(spec, spec.concepts[k], conds, prompts[int(np.ravel_multi_index(ref_vals, spec.values))],
                   prompts[h], target, probe, samplers or _samplers(sampling, member.eval, spec))


def _joint(st: Setting, x) -> float:
    """Fraction of samples [n, *x_shape] showing every concept of the held-out class; a
    non-finite sample is wrong."""
    x = np.asarray(x)
    finite = np.isfinite(x.reshape(len(x), -1)).all(-1)
    ok = P.correct(st.probe, np.where(finite.reshape(-1, *([1] * (x.ndim - 1))), x, 0), st.target).all(-1)
    return float((ok & finite).mean())


def accuracies(st: Setting, params, key, latent=LATENT_STRENGTHS) -> tuple[np.ndarray, np.ndarray]:
    """Joint held-out accuracy of one set of samples drawn with ``key``: ([1 + S] naive then each
    overprompting strength, [L] each latent strength)."""
    plain, steered = st.samplers
    n = len(st.target)
    x = np.asarray(plain(params, jnp.repeat(st.conds, n, 0), key)).reshape(len(st.conds), n, *st.spec.x_shape)
    xs = np.asarray(steered(params, st.cond_ref, st.cond_held, jnp.asarray(latent, jnp.float32), key))
    return np.array([_joint(st, xi) for xi in x]), np.array([_joint(st, xi) for xi in xs])


def elicit_step(st: Setting, params, key, latent=LATENT_STRENGTHS) -> dict:
    """Elicitation at one checkpoint: strengths chosen on the samples of ``fold_in(key, 0)``,
    every reported accuracy measured on those of ``fold_in(key, 1)``.

    Returns {"naive", "over", "latent": accuracy; "over_strength", "latent_strength": index of the
    chosen strength; "over_each" [S], "latent_each" [L]: each strength's own accuracy}.
    """
    sel_plain, sel_latent = accuracies(st, params, jax.random.fold_in(key, 0), latent)
    rep_plain, rep_latent = accuracies(st, params, jax.random.fold_in(key, 1), latent)
    over, i_over = choose(sel_plain[1:], rep_plain[1:])
    lat, i_lat = choose(sel_latent, rep_latent)
    return {"naive": float(rep_plain[0]), "over": over, "latent": lat, "over_strength": i_over,
            "latent_strength": i_lat, "over_each": rep_plain[1:].tolist(), "latent_each": rep_latent.tolist()}


def elicit_member(cfg: C.Config, member: C.Config, params_by_step: dict, probe, key, *,
                  concept: str | None = None, samplers=None) -> dict:
    """Accuracy curves of one member from {step: params}: {"naive", "over", "latent"} -> [T], plus
    the chosen strengths and each strength's curve (``elicit_step``). ``key``: the member's
    elicitation stream; checkpoint ``step`` uses ``fold_in(key, step)``."""
    st = setting(cfg, member, probe, concept, samplers)
    recs = [elicit_step(st, params_by_step[s], jax.random.fold_in(key, s)) for s in sorted(params_by_step)]
    return _curves(recs)


def _curves(recs: list[dict]) -> dict:
    """[T] per-checkpoint records -> {name: [T]} (``*_each``: [S][T], one curve per strength)."""
    out = {k: [r[k] for r in recs] for k in recs[0] if not k.endswith("_each")}
    for k in ("over_each", "latent_each"):
        out[k] = np.asarray([r[k] for r in recs]).T.tolist()
    return out


def elicit_run(run_dir, threshold: float = 0.8, *, probe_kw: dict | None = None, write: bool = True,
               concept: str | None = None, progress: bool = True, every: int = 1) -> dict:
    """Elicitation of every member of a run: writes RUN_DIR/elicit.json and figures/elicit.png.

    ``concept`` names the concept to overprompt and steer (default: ``target_concept``);
    ``every`` = k elicits at every k-th checkpoint with saved parameters (the first, the k+1-th, ...,
    and the last), a k-th of the cost. The saved parameters are read one checkpoint at a time (all
    members of it).
    Raises RunDirError: no saved parameters, or no held-out class in the run's config.
    ValueError: ``every`` < 1.
    """
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every={every!r} is invalid: allowed an integer >= 1")
    from tqdm.auto import tqdm

    from jaxconcept import stack
    from jaxconcept.step import member_keys

    run_dir = rundir.path(run_dir)
    cfg = rundir.load_config(run_dir)
    members = C.members(cfg)
    if not D.spec(members[0].data).held_out:
        raise rundir.RunDirError(f"{run_dir}: its config holds no class out (every class is trained), and "
                                 "elicitation measures how a held-out class emerges; train a run that holds one "
                                 "out (data.held_out, or for vectors data.train_classes)")
    parts = groups.of_run(run_dir, cfg)  # a sweep of several groups: each group's parameters in turn
    steps = groups.steps_with(run_dir, "params", parts)
    if not steps:
        raise rundir.RunDirError(f"{run_dir} has no saved parameters (train with eval.save_params=true)")
    steps = sorted(set(steps[::every]) | {steps[-1]})
    try:
        info = rundir.load_members(run_dir)
    except rundir.RunDirError:
        info = [{"index": i, **C.sweep_settings(m), "values": C.member_values(cfg, m)} for i, m in enumerate(members)]
    settings = [setting(cfg, m, P.probe_for(m.data, **{"band": cfg.eval.vector_band, **(probe_kw or {})}),
                        concept) for m in members]
    keys = [member_keys(int(m.seeds[0]))["elicit"] for m in members]
    recs = [[] for _ in members]
    for s in tqdm(steps, desc="elicit", unit="checkpoint", disable=not progress, dynamic_ncols=True):
        for part in parts:
            stacked = stack.load_params(run_dir, s, part)  # one checkpoint of a group's members at a time
            for row, i in enumerate(part.members):
                p = jax.tree.map(lambda a: jnp.asarray(a[row]), stacked)
                recs[i].append(elicit_step(settings[i], p, jax.random.fold_in(keys[i], s)))
    turns = _turn_steps(run_dir)
    out = {"run_dir": str(run_dir), "threshold": threshold, "steps": steps, "over_strengths": list(OVER_STRENGTHS),
           "latent_strengths": list(LATENT_STRENGTHS),
           "estimate": "strength chosen on one set of samples, accuracy reported from an independent set",
           "members": []}
    for i, st in enumerate(settings):
        curves = _curves(recs[i])
        acc = {k: curves[k] for k in ("naive", "over", "latent")}
        emerge = {k: dynamics.learning_time(steps, v, threshold) for k, v in acc.items()}
        by_strength = {kind: {str(s): dynamics.learning_time(steps, c, threshold) for s, c in zip(strengths, curves[f"{kind}_each"])}
                       for kind, strengths in (("over", OVER_STRENGTHS), ("latent", LATENT_STRENGTHS))}
        turn_step = turns.get(i)
        rel = {k: (None if v is None or turn_step is None else v - turn_step) for k, v in emerge.items()}
        early = None if emerge["naive"] is None else {
            k: (None if emerge[k] is None else emerge["naive"] - emerge[k]) for k in ("over", "latent")}
        out["members"].append({**{k: info[i].get(k) for k in ("index", "seed", "sep_col", "sep_size", "m", "s")},
                               "group": info[i].get("group", 0), "values": info[i].get("values", {}),
                               "concept": st.concept, "accuracy": acc, "emergence_step": emerge,
                               "chosen_strength": {"over": [OVER_STRENGTHS[j] for j in curves["over_strength"]],
                                                   "latent": [LATENT_STRENGTHS[j] for j in curves["latent_strength"]]},
                               "per_strength": {"over": curves["over_each"], "latent": curves["latent_each"]},
                               "emergence_step_per_strength": by_strength, "turn_step": turn_step,
                               "emergence_minus_turn": rel, "steps_earlier_than_naive": early})
    if write:
        rundir.write_json(run_dir / "elicit.json", out)
        from jaxconcept import plots

        plots.elicit_figure(out, run_dir / "figures" / "elicit.png")
    return out


def _turn_steps(run_dir) -> dict:
    """{member index: step of its held-out class's first turn} from analysis.json, when present."""
    path = run_dir / "analysis.json"
    if not path.exists():
        return {}
    analysis = rundir.read_json(path, "written by `jaxconcept analyze`; run it again")
    out = {}
    for m in analysis.get("members", []) if isinstance(analysis, dict) else []:
        turn = m.get("turn") if isinstance(m, dict) and "index" in m else None
        first = next(iter(turn.values()), None) if isinstance(turn, dict) else None
        if isinstance(first, dict):
            out[m["index"]] = first.get("step")
    return out
