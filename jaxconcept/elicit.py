"""Hidden capabilities: accuracy on the held-out class under naive prompting, overprompting and
latent interventions, at every evaluation checkpoint of a run (SPEC A4).

For every member and checkpoint (parameters saved by training, ``eval.save_params``):
  naive   - samples of the held-out prompt;
  over    - the best over ``OVER_STRENGTHS`` of prompts pushed past the training range along the
            concept with the weakest concept signal among those in which the held-out class
            differs from class 0: the one learned last (``overprompts``; colour in the paper);
  latent  - the best over ``LATENT_STRENGTHS`` of adding strength x (activation(held-out prompt)
            - activation(the prompt differing in that concept)) at every concept projection
            (``steering_edits``); all strengths sampled in one vmapped, jitted call.
Emergence step of each = first step with joint accuracy >= threshold (``dynamics.learning_time``).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import config as C, data as D, diffusion, dynamics, interventions as I, nets, probe as P, rundir

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
              output=eval_cfg.sampler_output)
    plain = jax.jit(lambda p, c, kk: diffusion.sample(diffusion.make_apply(net), model_cfg, p, c, kk, **kw))

    def steered(p, cond_from, cond_to, alpha, kk):
        edits = I.steering_edits(net, spec, p["net"], cond_from, cond_to, alpha)
        return diffusion.sample(I.intervene(net, edits), model_cfg, p, jnp.repeat(cond_to[None], n, 0), kk, **kw)

    return plain, jax.jit(jax.vmap(steered, in_axes=(None, None, None, 0, None)))


def elicit_member(cfg: C.Config, member: C.Config, params_by_step: dict, probe, key, *,
                  over=OVER_STRENGTHS, latent=LATENT_STRENGTHS, concept: str | None = None) -> dict:
    """Accuracy curves (joint, held-out class) of one member: {"naive", "over", "latent"} -> [T].
    ``concept`` names the concept to push (default: ``target_concept``)."""
    spec = D.spec(member.data)
    dp = D.params(member.data)
    h = spec.held_out[0]
    k = target_concept(member, h, concept)
    vals = list(spec.class_values(h))
    ref_vals = list(vals)
    ref_vals[k] = 0
    ref = int(np.ravel_multi_index(ref_vals, spec.values))
    prompts = D.prompts(spec, dp)
    n = cfg.eval.n_samples
    target = np.tile(np.asarray(vals)[None], (n, 1))
    conds = jnp.concatenate([prompts[h][None], I.overprompts(spec, dp, h, k, over)])  # [1 + L, cond_dim]
    plain, steered_all = _samplers(cfg.model, cfg.eval, spec)
    acc = {"naive": [], "over": [], "latent": []}

    def joint(x):
        x = np.asarray(x)
        finite = np.isfinite(x.reshape(len(x), -1)).all(-1)  # a non-finite sample is wrong
        ok = P.correct(probe, np.where(finite.reshape(-1, *([1] * (x.ndim - 1))), x, 0), target).all(-1)
        return (ok & finite).mean()

    for step in sorted(params_by_step):
        p = params_by_step[step]
        kk = jax.random.fold_in(key, step)
        x = np.asarray(plain(p, jnp.repeat(conds, n, 0), kk)).reshape(len(conds), n, *spec.x_shape)
        a = [joint(xi) for xi in x]
        acc["naive"].append(float(a[0]))
        acc["over"].append(float(max(a[1:])))
        xs = np.asarray(steered_all(p, prompts[ref], prompts[h], jnp.asarray(latent, jnp.float32), kk))
        acc["latent"].append(float(max(joint(xi) for xi in xs)))
    return acc


def elicit_run(run_dir, threshold: float = 0.8, *, probe_kw: dict | None = None, write: bool = True,
               concept: str | None = None) -> dict:
    """Elicitation of every member of a run: writes RUN_DIR/elicit.json and figures/elicit.png.
    ``concept`` names the concept to overprompt and steer (default: ``target_concept``)."""
    from jaxconcept import sweep

    run_dir = Path(run_dir)
    cfg = rundir.load_config(run_dir)
    steps = rundir.steps_with(run_dir, "params")
    if not steps:
        raise rundir.RunDirError(f"{run_dir} has no saved parameters (train with eval.save_params=true)")
    members = C.members(cfg)
    if not D.spec(members[0].data).held_out:
        raise rundir.RunDirError(f"{run_dir}: its config holds no class out (data.held_out is empty and every class "
                                 "is trained); elicitation measures how a held-out class emerges — train with "
                                 "data.held_out=[...]")
    try:
        info = rundir.load_members(run_dir)
    except rundir.RunDirError:
        info = [{"index": i, "seed": m.seeds[0], "sep_col": m.data.sep_col, "sep_size": m.data.sep_size,
                 "m": list(m.data.m), "s": list(m.data.s)} for i, m in enumerate(members)]
    stacked = {s: sweep.load_state_params(run_dir, s) for s in steps}
    analysis_path = run_dir / "analysis.json"
    turns = {}
    if analysis_path.exists():
        analysis = rundir.read_json(analysis_path, "written by `jaxconcept analyze`; run it again")
        for m in analysis.get("members", []) if isinstance(analysis, dict) else []:
            if isinstance(m, dict) and "index" in m:
                turns[m["index"]] = m.get("turn")
    out = {"run_dir": str(run_dir), "threshold": threshold, "steps": steps, "over_strengths": list(OVER_STRENGTHS),
           "latent_strengths": list(LATENT_STRENGTHS), "members": []}
    for i, m in enumerate(members):
        probe = P.probe_for(m.data, **{"band": cfg.eval.vector_band, **(probe_kw or {})})
        params_i = {s: jax.tree.map(lambda a: jnp.asarray(a[i]), stacked[s]) for s in steps}
        spec = D.spec(m.data)
        name = spec.concepts[target_concept(m, spec.held_out[0], concept)]
        acc = elicit_member(cfg, m, params_i, probe, jax.random.PRNGKey(int(m.seeds[0])), concept=name)
        emerge = {k: dynamics.learning_time(steps, v, threshold) for k, v in acc.items()}
        turn = turns.get(i)
        turn_step = None
        if isinstance(turn, dict):
            first = next(iter(turn.values()), None)
            turn_step = first.get("step") if isinstance(first, dict) else None
        rel = {k: (None if v is None or turn_step is None else v - turn_step) for k, v in emerge.items()}
        early = None if emerge["naive"] is None else {
            k: (None if emerge[k] is None else emerge["naive"] - emerge[k]) for k in ("over", "latent")}
        out["members"].append({**{k: info[i][k] for k in ("index", "seed", "sep_col", "sep_size", "m", "s")},
                               "concept": name, "accuracy": acc, "emergence_step": emerge, "turn_step": turn_step,
                               "emergence_minus_turn": rel, "steps_earlier_than_naive": early})
    if write:
        rundir.write_json(run_dir / "elicit.json", out)
        from jaxconcept import plots

        plots.elicit_figure(out, run_dir / "figures" / "elicit.png")
    return out
