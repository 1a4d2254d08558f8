"""The paper's three claims, measured on one run: a summary table of rows with their statistics
and verdicts (``table``), printed by ``jaxconcept analyze`` and ``elicit`` and kept in
analysis.json ("claims").

1. Learning time falls as the concept signal grows: per replicate (a seed; in a sweep of other
   fields too, a seed and their values: ``replicate``), Spearman's rho of T (censored at the run
   length) against the concept's signal over the run's data settings, and its median over
   replicates; with exactly two settings, the paired difference T(weaker) - T(stronger) per
   replicate with a bootstrap interval. Verdict: three settings or more, "reproduced" when the
   median rho <= -0.8 and every replicate's rho < 0, "partly" when the median rho < 0; two
   settings, "reproduced" when the difference's interval lies above 0 and at least 3 in 4
   replicates' differences are > 0, "partly" when the mean difference > 0; else "not".
2. Memorise, then generalise (``dynamics.corner_path``), beside the reference's saturation marker
   and our chord-angle turn: "reproduced" when at least 75 % of the members do, "partly" 50 %.
3. Hidden capabilities (from elicit.json): per elicitation arm, the lead over naive prompting
   (naive emergence - the arm's; never = the run length, censored) with a bootstrap interval over
   the members, per setting and pooled; verdict ``stats.verdict`` on the pooled lead. The
   reference's statistic (the best prompt scored on the samples that chose it) is listed
   beside, labelled biased, without a verdict.

These are the rules the pre-registered configs (experiments/prereg_*.json) state.
"""
from __future__ import annotations

import json

import numpy as np

from jaxconcept.analysis import stats

SETTING_FIELDS = ("sep_col", "sep_size", "m", "s", "attributes", "mask_prob")
ARMS = {"over_ref": "overprompting (reference's fixed colours)", "over": "overprompting (scaled)",
        "latent": "latent (held-out prompt direction)", "latent_comp": "latent (compositional, training classes only)"}


def swept_values(member: dict) -> dict:
    """The member's swept field values ("values", e.g. {"train.lr": 0.001}) other than the seed."""
    return {k: v for k, v in member.get("values", {}).items() if k != "seed"}


def setting_key(member: dict) -> str:
    """The member's sweep setting apart from its seed, as a JSON string (members with the same
    key differ only in their seed)."""
    return json.dumps([[member.get(k) for k in SETTING_FIELDS], swept_values(member)], sort_keys=True)


def replicate(member: dict) -> str:
    """The member's seed and its swept values outside the data section (e.g. "0" or "0, train.lr=0.001"):
    the members that share it form one replicate of a claim-1 series, in which only the
    data-generating setting, and so the concept signal, varies."""
    rest = [f"{k}={v}" for k, v in swept_values(member).items() if not k.startswith("data.")]
    return ", ".join([str(member["seed"]), *rest])


def setting_label(member: dict) -> str:
    """A short name of the member's setting, e.g. "sep_col=0.35" or "m=[1.0, 0.2]"."""
    parts = [f"{k}={member[k]}" for k in SETTING_FIELDS if member.get(k) is not None
             and k not in ("sep_size", "s", "attributes") and not (k == "mask_prob" and member[k] == 1.0)]
    parts += [f"{k}={v}" for k, v in swept_values(member).items() if k.removeprefix("data.") not in SETTING_FIELDS]
    return ", ".join(parts) or "all"


def _groups(members: list[dict]) -> dict:
    out: dict = {}
    for m in members:
        out.setdefault(setting_key(m), []).append(m)
    return out


def _fmt(v, nd=0):
    return "-" if v is None else f"{v:,.{nd}f}"


def _interval(b: dict) -> str:
    return f"{_fmt(b['mean'])} [{_fmt(b['low'])}, {_fmt(b['high'])}]"


def time_vs_signal(members: list[dict], times: list, signals: list, run_length: float, seed: int = 0) -> dict:
    """Claim 1's statistics for one class and concept.

    Args:
      members: member records (seed and setting fields); times: each member's T (None = never);
      signals: each member's signal of the concept. run_length: where never is censored.
    Returns:
      {"by_setting": [{"setting", "signal", "mean", "n", "censored"}] ordered by signal,
       "rho": {replicate: rho or None} (``replicate``: the seed, and any swept field outside the
       data section), "median_rho", "difference" (two settings: bootstrap of the per-replicate
       T(weaker) - T(stronger)), "verdict"}.
    """
    t, cens = stats.censor(times, run_length)
    keys = [setting_key(m) for m in members]
    order = sorted(set(keys), key=lambda k: np.mean([s for s, kk in zip(signals, keys) if kk == k]))
    by_setting = []
    for k in order:
        sel = [i for i, kk in enumerate(keys) if kk == k]
        by_setting.append({"setting": setting_label(members[sel[0]]), "signal": float(np.mean([signals[i] for i in sel])),
                           "mean": float(t[sel].mean()), "n": len(sel), "censored": int(cens[sel].sum())})
    rho = {}
    reps = [replicate(m) for m in members]
    for rep in sorted(set(reps), key=lambda r: [m["seed"] for m, rr in zip(members, reps) if rr == r][0]):
        sel = [i for i, r in enumerate(reps) if r == rep]
        rho[rep] = stats.spearman([signals[i] for i in sel], t[sel]) if len(sel) > 1 else None
    got = [r for r in rho.values() if r is not None]
    med = float(np.median(got)) if got else None
    diff = None
    if len(order) == 2:
        d = []
        for rep in rho:
            pair = [[t[i] for i, (r, kk) in enumerate(zip(reps, keys)) if r == rep and kk == k] for k in order]
            if all(len(p) == 1 for p in pair):
                d.append(pair[0][0] - pair[1][0])
        diff = {**stats.bootstrap_mean(d, seed), "positive": int(sum(x > 0 for x in d))}
    if len(order) >= 3:
        verdict = ("reproduced" if med is not None and med <= -0.8 and all(r < 0 for r in got) and len(got) == len(rho)
                   else "partly" if med is not None and med < 0 else "not")
    elif diff is not None and diff["n"]:
        ok = diff["low"] > 0 and diff["positive"] >= 0.75 * diff["n"]
        verdict = "reproduced" if ok else "partly" if diff["mean"] > 0 else "not"
    else:
        verdict = "not"
    return {"by_setting": by_setting, "rho": rho, "median_rho": med,
            "difference": diff, "verdict": verdict}


def _knob(member: dict, concept: str):
    """The sweep value that sets a concept's signal (sep_col, sep_size, m_i), else its signal."""
    if concept in ("colour", "size"):
        return member.get({"colour": "sep_col", "size": "sep_size"}[concept])
    if concept.startswith("dim") and member.get("m") is not None:
        return member["m"][int(concept[3:])]
    return member["signal"].get(concept)


def claim1(analysis: dict) -> list[dict]:
    """Claim 1 rows: for each held-out class, and for the training classes' mean, each concept
    whose signal the run's settings vary (through its separation: sep_col, sep_size, m_i)."""
    members, names, rows = analysis["members"], analysis["class_names"], []
    run_length = analysis.get("run_length", analysis["steps"][-1])
    for con in analysis["concepts"]:
        signals = [m["signal"].get(con) for m in members]
        if any(s is None for s in signals) or len({json.dumps(_knob(m, con)) for m in members}) < 2:
            continue
        classes = [(names[h], [m["learning_time"][names[h]][con] for m in members]) for h in analysis["held_out"]]
        train = [names[c] for c in analysis["train_classes"]]
        censored_t, _ = zip(*[stats.censor([m["learning_time"][c][con] for c in train], run_length) for m in members])
        classes.append(("training classes (mean)", [float(np.mean(x)) for x in censored_t]))
        for cls, times in classes:
            r = time_vs_signal(members, times, signals, run_length)
            ours = "; ".join(f"{b['setting']}: {_fmt(b['mean'])}" + (f" ({b['censored']} of {b['n']} never)"
                                                                       if b["censored"] else "") for b in r["by_setting"])
            rho = ", ".join(_fmt(v, 2) for v in r["rho"].values())
            per = "seed" if all(", " not in k for k in r["rho"]) else "replicate (seed, other swept fields)"
            stat = f"rho per {per} {rho}; median {_fmt(r['median_rho'], 2)}"
            if r["difference"]:
                stat += f"; T(weaker) - T(stronger) {_interval(r['difference'])}, > 0 in {r['difference']['positive']} of {r['difference']['n']}"
            rows.append({"claim": 1, "what": f"T of {con}, {cls}", "ours": ours, "statistic": stat,
                         "verdict": r["verdict"], "numbers": r})
    return rows


def _median(values) -> str:
    got = [v for v in values if v is not None]
    return _fmt(float(np.median(got))) if got else "-"


def claim2(analysis: dict) -> list[dict]:
    """Claim 2 rows: per held-out class, how many members memorise then generalise, with the
    saturation step and our turn beside."""
    rows, ms = [], analysis["members"]
    for h in analysis["held_out"]:
        name = analysis["class_names"][h]
        paths = [m["path"][name] for m in ms]
        k = sum(p["memorise_then_generalise"] for p in paths)
        sat = [m.get("saturation") for m in ms]
        turn = [m["turn"][name]["step"] if m["turn"][name]["turned"] else None for m in ms]
        gap = [p["own_step"] - s for p, s in zip(paths, sat) if p["own_step"] is not None and s is not None]
        frac = k / len(ms)
        rows.append({"claim": 2, "what": f"{name}: memorise ({paths[0].get('memo', 'a training class')}), then generalise",
                     "ours": f"{k} of {len(ms)} members",
                     "statistic": f"saturation median {_median(sat)} ({sum(s is None for s in sat)} never); our turn "
                                  f"median {_median(turn)}; first at own corner - saturation median {_median(gap)}",
                     "verdict": "reproduced" if frac >= 0.75 else "partly" if frac >= 0.5 else "not",
                     "numbers": {"n": len(ms), "memorise_then_generalise": k, "saturation": sat, "turn": turn,
                                 "own_minus_saturation": gap}})
    return rows


def claim3(result: dict, seed: int = 0) -> list[dict]:
    """Claim 3 rows from an elicit.json result: one per arm present, then the biased statistic."""
    run_length, ms, rows = result["run_length"], result["members"], []
    naive, naive_cens = stats.censor([m["emergence_step"]["naive"] for m in ms], run_length)
    arms = [a for a in ARMS if all(m["emergence_step"].get(a, "absent") != "absent" for m in ms)]
    for arm in arms + ["reference_biased"]:
        e, cens = stats.censor([m["emergence_step"][arm] for m in ms], run_length)
        lead = naive - e
        by = {}
        for k, g in _groups(ms).items():
            sel = [i for i, m in enumerate(ms) if setting_key(m) == k]
            by[setting_label(g[0])] = stats.bootstrap_mean(lead[sel], seed)
        pooled = stats.bootstrap_mean(lead, seed)
        rel = [m["emergence_minus_turn"].get(arm) for m in ms]
        rel = [x for x in rel if x is not None]
        biased = arm == "reference_biased"
        rows.append({"claim": 3, "what": ("BIASED: the reference's statistic (best prompt on its own samples)" if biased
                                          else f"lead of {ARMS[arm]} over naive"),
                     "ours": "; ".join(f"{k}: {_interval(b)}" for k, b in by.items()),
                     "statistic": f"pooled {_interval(pooled)} over {pooled['n']} members; never: naive "
                                  f"{int(naive_cens.sum())}, arm {int(cens.sum())}; emergence - saturation median "
                                  f"{_median(rel)}",
                     "verdict": "biased: no verdict" if biased else stats.verdict(pooled["low"], pooled["mean"]),
                     "numbers": {"pooled": pooled, "by_setting": by, "lead": lead.tolist(), "censored": cens.tolist(),
                                 "emergence_minus_saturation": rel}})
    return rows


def table(analysis: dict | None, elicit: dict | None = None) -> list[dict]:
    """Every claim's rows for a run (claims 1-2 from its analysis, 3 from its elicitation)."""
    rows = []
    if analysis is not None:
        rows += claim1(analysis) + claim2(analysis)
    if elicit is not None:
        rows += claim3(elicit)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as text, one block per row: claim, what, ours, statistic, verdict."""
    lines = []
    for r in rows:
        lines.append(f"  claim {r['claim']} | {r['what']} | {r['verdict']}")
        lines.append(f"      {r['ours']}")
        lines.append(f"      {r['statistic']}")
    return "\n".join(lines)
