"""Sweep axes: which fields may take several values in one run, the three ways of giving them
(grid, zipped, sampled), the members they expand into, and the groups of members that share one
compiled program.

Every field may be an axis except those of ``REFUSED`` (each refused in one line saying why).
An axis of a field in ``PER_MEMBER`` is held per member in one stacked program (data-generating
parameters, the train state's hyperparameters, the seed); an axis of any other field changes a
shape or a program, so it splits the members into groups (``groups``), each trained as its own
stack, one after another, in the same run directory.

    grid     a list in a field's place: ``train.lr=[1e-3,3e-3]``; the axes multiply
    zipped   grid axes named together in ``sweep.zip`` (equal lengths) take their values together
    sampled  ``{"log_uniform": [lo, hi]}``, ``{"uniform": [lo, hi]}`` or ``{"choice": [a, b, ...]}``
             in a field's place: every sampled field is drawn ``sweep.n`` times (one joint axis of
             n points, a random search), seeded by ``sweep.seed``

Members are row-major over the axes, each axis (a field, a zipped group, the sampled fields
together) at the place of its first field in field order (the data kind's fields, then model,
train, eval, each in declaration order), seeds innermost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from typing import Annotated, get_args, get_origin

from jaxconcept.config.checks import ConfigError, field_names, invalid, untuple

SECTIONS = ("data", "model", "train", "eval")
# data fields held per member as data-generating parameters (``data.params``): a stack renders every member's data
SWEEP_FIELDS = ("data.sep_col", "data.sep_size", "data.m", "data.s", "data.attributes", "data.cond_noise",
                "data.mask_prob")
# fields held per member in the train state (``step.TrainState.hyper``) and read as traced values
HYPER_FIELDS = ("train.lr", "train.weight_decay", "train.grad_clip", "train.ema", "train.warmup", "train.p_cfg",
                "model.dropout", "model.init_scale", "model.gamma_min", "model.gamma_max", "eval.w_cfg")
PER_MEMBER = SWEEP_FIELDS + HYPER_FIELDS + ("seeds",)  # axes of these share one compiled program

_SCHEDULE = "it is the run's schedule: every member stops, evaluates and checkpoints at the same steps"
_STACKING = "it says how the run stacks its members, chosen once per run"
_WRITES = "it says what the run writes, once per run"
_CLASSES = "it sets the classes and concepts, which one analysis compares across every member"
REFUSED = {
    "train.steps": _SCHEDULE, "train.steps_per_call": _SCHEDULE, "train.checkpoint_every": _SCHEDULE,
    "eval.n_points": _SCHEDULE, "eval.first": _SCHEDULE, "eval.steps": _SCHEDULE,
    "train.strategy": _STACKING, "train.map_batch_size": _STACKING, "train.memory_budget": _STACKING,
    "train.keep_checkpoints": _WRITES, "train.tensorboard": _WRITES, "eval.save_params": _WRITES,
    "eval.sample_dtype": _WRITES,
    "eval.vector_band": "the analysis reads it once for the whole run (the probe's acceptance band)",
    "data.kind": "every member of a run is data of one kind (and its network kind), analysed together",
    "model.arch": "every member of a run is data of one kind (and its network kind), analysed together",
    "data.concepts": _CLASSES, "data.values": _CLASSES, "data.held_out": _CLASSES, "data.dim": _CLASSES,
    "data.perdim": _CLASSES, "data.train_classes": _CLASSES,
}
LAWS = ("uniform", "log_uniform", "choice")


# --------------------------------------------------------------------------------------------
# Field order and single fields
# --------------------------------------------------------------------------------------------
def order(cfg, name: str) -> tuple:
    """Sort key of an axis name: its section, then its field's place in its class; seeds last."""
    if name == "seeds":
        return (len(SECTIONS), 0)
    sec, field = name.split(".", 1)
    return (SECTIONS.index(sec), field_names(type(getattr(cfg, sec))).index(field))


def check_axis(cfg, name: str) -> None:
    """Raise ConfigError unless ``name`` (e.g. "train.lr", "seeds") may be a sweep axis of ``cfg``."""
    if name == "seeds":
        return
    sec, _, field = name.partition(".")
    if sec not in SECTIONS or not field:
        raise ConfigError(f"sweep axis {name!r} is not a field: allowed SECTION.FIELD (e.g. train.lr) or seeds")
    cls = type(getattr(cfg, sec))
    if field not in field_names(cls):
        if sec == "data":
            raise ConfigError(f"{name} does not apply to data.kind={cfg.data.kind!r}: its fields are "
                              + ", ".join(sorted(field_names(cls))))
        raise ConfigError(f"unknown config key {name!r}: allowed {', '.join(sorted(field_names(cls)))}")
    if name in REFUSED:
        raise refusal(name)


def refusal(name: str) -> ConfigError:
    """The one-line error for a field of ``REFUSED`` given several values."""
    return ConfigError(f"{name} cannot be a sweep axis: {REFUSED[name]}; give it one value")


def _is_int(cfg, name: str) -> bool:
    """The field is declared an integer (not a real number that happens to be whole)."""
    sec, field = name.split(".", 1)
    tp = type(getattr(cfg, sec)).__pydantic_fields__[field].annotation
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp is int


def point(cfg, values: dict):
    """The single run of ``cfg`` with ``values`` ({axis: value}) and member 0's values elsewhere."""
    by_sec: dict = {}
    for a, v in values.items():
        if a != "seeds":
            sec, field = a.split(".", 1)
            by_sec.setdefault(sec, {})[field] = v
    secs = {s: dataclasses.replace(getattr(cfg, s), **f) for s, f in by_sec.items()}
    return dataclasses.replace(cfg, **secs, seed=values.get("seeds", cfg.seed), sweep=(), zipped=(), sampled=(),
                               draws=0, draw_seed=0)


# --------------------------------------------------------------------------------------------
# Sampled axes
# --------------------------------------------------------------------------------------------
def uniform(seed: int, name: str, i: int) -> float:
    """Draw ``i`` of field ``name`` under sweep seed ``seed``: a uniform number in [0, 1) from the
    first 53 bits of SHA-256 of "seed/name/i", so draws are the same on every machine and version,
    and adding a field to a search leaves the other fields' draws as they were."""
    h = hashlib.sha256(f"{seed}/{name}/{i}".encode()).digest()
    return (int.from_bytes(h[:8], "big") >> 11) / 2.0 ** 53


def law_error(name: str, given: dict) -> ConfigError:
    """The one-line error for a mapping in a field's place that is not a sampled axis."""
    shown = json.dumps({k: untuple(v) for k, v in given.items()})
    return ConfigError(f"{name}={shown} is invalid: allowed a sampled axis {{\"uniform\": [lo, hi]}}, "
                       '{"log_uniform": [lo, hi]} (0 < lo < hi) or {"choice": [a, b, ...]}')


def check_law(name: str, law: str, args: tuple) -> None:
    """Raise ConfigError unless (law, args) is a sampled axis: uniform or log_uniform over [lo, hi]
    (lo < hi, lo > 0 for log_uniform), or choice among a non-empty list."""
    ok = law in LAWS and isinstance(args, tuple) and len(args) >= 1
    if ok and law != "choice":
        ok = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                                    for a in args) and args[0] < args[1] and (law == "uniform" or args[0] > 0)
    if not ok:
        raise law_error(name, {law: args})


def draw(cfg, name: str, law: str, args: tuple, i: int):
    """Draw ``i`` of the sampled field ``name``. An integer field takes integers: "uniform" each of
    lo .. hi equally likely, "log_uniform" the continuous draw rounded."""
    u = uniform(cfg.draw_seed, name, i)
    if law == "choice":
        return args[min(int(u * len(args)), len(args) - 1)]
    lo, hi = args
    if _is_int(cfg, name):
        if law == "uniform":
            return int(lo) + min(int(u * (int(hi) - int(lo) + 1)), int(hi) - int(lo))
        return int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
    if law == "uniform":
        return lo + u * (hi - lo)
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


# --------------------------------------------------------------------------------------------
# Axes of a config: normalisation, units, members
# --------------------------------------------------------------------------------------------
def units(cfg) -> list[tuple[tuple, list]]:
    """The axes of ``cfg`` as units of the product: [(field names, [points: tuple of values])],
    in member order (each unit at its first field's place, seeds last)."""
    grid = dict(cfg.sweep)
    out, zipped = [], {n for group in cfg.zipped for n in group}
    for group in cfg.zipped:
        out.append((tuple(group), list(zip(*(grid[n] for n in group)))))
    out += [((n,), [(v,) for v in vals]) for n, vals in cfg.sweep if n not in zipped]
    if cfg.sampled:
        names = tuple(n for n, _, _ in cfg.sampled)
        out.append((names, [tuple(draw(cfg, n, law, args, i) for n, law, args in cfg.sampled)
                            for i in range(cfg.draws)]))
    return sorted(out, key=lambda u: order(cfg, u[0][0]))


def normalized(cfg) -> dict:
    """The fields ``Config.__post_init__`` sets: sweep, zipped and sampled in member order, without
    one-value grid axes; every swept field (and ``seed``) at member 0's value. Raises ConfigError
    for an axis that is not a field, is refused, is empty or named twice, a bad zip or law."""
    axes = dict(cfg.sweep)
    if len(axes) != len(cfg.sweep):
        raise ConfigError(f"sweep names an axis twice: {[a for a, _ in cfg.sweep]}")
    sampled = {n: (law, tuple(args)) for n, law, args in cfg.sampled}
    for name, values in axes.items():
        check_axis(cfg, name)
        if not values:
            raise invalid(name, values, "a value or a non-empty list of values")
    for name, (law, args) in sampled.items():
        check_axis(cfg, name)
        check_law(name, law, args)
        if name in axes or name == "seeds":
            raise ConfigError(f"{name} is both a list and a sampled axis: give one of them")
    seeds = axes.get("seeds", (cfg.seed,))
    if not all(type(s) is int and 0 <= s < 2 ** 31 for s in seeds) or len(set(seeds)) != len(seeds):
        raise invalid("seeds", seeds, "a non-empty list of distinct integers in [0, 2**31)")
    if sampled and cfg.draws < 1:
        raise invalid("sweep.n", cfg.draws, f"the number of draws of the sampled fields ({', '.join(sampled)}), "
                      "an integer >= 1")
    if cfg.draws and not sampled:
        raise invalid("sweep.n", cfg.draws, "0 when no field is sampled (sampled: {\"log_uniform\": [lo, hi]} "
                      "in a field's place)")
    zipped, seen = [], set()
    for group in cfg.zipped:
        group = tuple(dict.fromkeys(group))
        missing = [n for n in group if n not in axes]
        if missing or len(group) < 2 or seen & set(group) or "seeds" in group:
            raise invalid("sweep.zip", untuple(cfg.zipped), "lists of two or more distinct fields, each in one "
                          "list only, each given a list of values" + (f" ({', '.join(missing)} is not)" if missing
                                                                      else ""))
        seen |= set(group)
        lengths = {n: len(axes[n]) for n in group}
        if len(set(lengths.values())) != 1:
            raise invalid("sweep.zip", untuple(group), "fields with as many values each, got "
                          + ", ".join(f"{n} {k}" for n, k in lengths.items()))
        if lengths[group[0]] > 1:
            zipped.append(tuple(sorted(group, key=lambda n: order(cfg, n))))
    if "data.attributes" in axes and len({len(v) for v in axes["data.attributes"]}) != 1:
        raise invalid("data.attributes", axes["data.attributes"], "lists of the same length in a sweep "
                      "(the concept grid is shared)")
    first = {n: v[0] for n, v in axes.items()}
    for n, (law, args) in sampled.items():
        first[n] = draw(cfg, n, law, args, 0)
    base = point(cfg, first) if first else cfg
    return {"data": base.data, "model": base.model, "train": base.train, "eval": base.eval, "seed": base.seed,
            "sweep": tuple((n, tuple(axes[n])) for n in sorted(axes, key=lambda n: order(cfg, n)) if len(axes[n]) > 1),
            "zipped": tuple(sorted(zipped, key=lambda g: order(cfg, g[0]))),
            "sampled": tuple((n, *sampled[n]) for n in sorted(sampled, key=lambda n: order(cfg, n))),
            "draws": cfg.draws if sampled else 0}


def check_points(cfg) -> None:
    """Each point of every axis with member 0's values elsewhere is a valid run (ConfigError if not)."""
    for names, points in units(cfg):
        for p in points[1:]:
            point(cfg, dict(zip(names, p)))


def members(cfg) -> list:
    """One config per member: the product of the axes in member order (module docstring). Each
    member has no axes and one seed."""
    us = units(cfg)
    if not us:
        return [cfg]
    return [point(cfg, {n: v for (names, _), p in zip(us, combo) for n, v in zip(names, p)})
            for combo in itertools.product(*(pts for _, pts in us))]


def swept(cfg) -> list[str]:
    """The fields that take more than one value ("seeds" for the seeds), in member order."""
    return sorted({n for names, pts in units(cfg) if len(pts) > 1 for n in names}, key=lambda n: order(cfg, n))


def member_values(cfg, member) -> dict:
    """A member's value of every swept field of ``cfg``, as JSON values: {"train.lr": 0.001, "seed": 3}."""
    out = {}
    for n in swept(cfg):
        if n == "seeds":
            out["seed"] = member.seed
        else:
            sec, field = n.split(".", 1)
            out[n] = untuple(getattr(getattr(member, sec), field))
    return out


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------
def program_key(member) -> str:
    """What a member's compiled programs depend on: its config less every ``PER_MEMBER`` field."""
    from jaxconcept.config.files import to_dict

    d = to_dict(member)
    for n in PER_MEMBER:
        if n != "seeds":
            sec, field = n.split(".", 1)
            d[sec].pop(field, None)
    for k in ("seeds", "name"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def groups(cfg, ms=None) -> list[tuple[int, ...]]:
    """Member indices of each group: members with the same ``program_key``, groups in the order of
    their first member, each group's members in member order. ``ms``: ``members(cfg)``, if at hand."""
    out: dict = {}
    for i, m in enumerate(ms if ms is not None else members(cfg)):
        out.setdefault(program_key(m), []).append(i)
    return [tuple(v) for v in out.values()]


def group_fields(cfg) -> list[str]:
    """The swept fields that split members into groups (not ``PER_MEMBER``)."""
    return [n for n in swept(cfg) if n not in PER_MEMBER]
