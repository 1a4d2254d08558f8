"""Configs as JSON-ready dicts, files and ``--set`` overrides.

In a dict (a file, a run's ``config.json``) a sweep is written where its fields are: a list of
values in a field's place (a list of lists for a list-valued field such as ``data.m`` or
``model.ch_mult``) and the list ``seeds`` are grid axes, ``{"log_uniform": [lo, hi]}`` (or
"uniform", "choice") a sampled axis, and a top-level ``"sweep": {"zip": [[field, ...]], "n": draws,
"seed": seed}`` zips grid axes and draws the sampled ones (``sweeps``); reading turns them into
``Config.sweep``, ``zipped``, ``sampled``, ``draws`` and ``draw_seed``.
Files written before the data kinds had their own classes list every kind's fields in one
``data`` section: there the other kinds' fields are skipped; elsewhere a field of another kind
is an error (unless at its default).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxconcept.config import sweeps
from jaxconcept.config.checks import ConfigError, field_names, invalid, untuple
from jaxconcept.config.presets import preset
from jaxconcept.config.sections import DATA_KINDS, Config, DataConfig, data_config, not_for_kind
from jaxconcept.config.sweeps import SECTIONS

TOP = (*SECTIONS, "seeds", "name", "sweep")
# the one data section of config.json files written before the data kinds had their own classes: a
# record of that old format (how it is recognised), not a list of today's fields, so it never grows
FLAT_DATA = frozenset({
    "kind", "concepts", "values", "sep_col", "sep_size", "image_size", "blur_sigma", "pixel_noise", "dim", "perdim",
    "m", "s", "normalize", "dim_nuisance", "nuisance", "cond_mode", "cond_noise", "attributes", "source", "data_dir",
    "crop", "augment", "jitter", "held_out", "train_classes", "masked", "n_per_class", "val_frac", "n_test"})


# fields that are gone, with the one value a run's config.json may still hold for them (read and dropped)
RETIRED = {"train.scan_unroll": 0}  # the training loop's length is traced now: a while loop, not unrolled
SWEEP_KEYS = ("zip", "n", "seed")  # the top-level "sweep" mapping: Config.zipped, draws, draw_seed


def _tuplify(v):
    if isinstance(v, dict):
        return {k: _tuplify(x) for k, x in v.items()}
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def to_dict(cfg: Config) -> dict:
    """JSON-ready nested dict (tuples become lists): each grid axis stands in its field's place as
    a list, each sampled field as {law: args}; zipped axes and the draws under "sweep"."""
    out = {s: {k: untuple(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}
    for a, v in cfg.sweep:
        if a != "seeds":
            sec, field = a.split(".", 1)
            out[sec][field] = untuple(v)
    for a, law, args in cfg.sampled:
        sec, field = a.split(".", 1)
        out[sec][field] = {law: untuple(args)}
    d = {**out, "seeds": list(cfg.seeds), "name": cfg.name}
    if cfg.zipped or cfg.sampled:
        d["sweep"] = {"zip": untuple(cfg.zipped), "n": cfg.draws, "seed": cfg.draw_seed}
    return d


def _is_axis(current, v) -> bool:
    """``v`` lists values for a field whose value now is ``current`` (a list of lists for a
    list-valued field)."""
    if not isinstance(v, tuple):
        return False
    return not isinstance(current, tuple) or (bool(v) and all(isinstance(x, tuple) for x in v))


def _place(name: str, current, v, axes: dict, sampled: dict) -> bool:
    """Put ``v`` given for field ``name`` where it belongs: a sampled axis ({law: args}), a grid
    axis (a list of values) or, returning True, the field's value (which drops any axis of it)."""
    axes.pop(name, None)
    sampled.pop(name, None)
    if isinstance(v, dict):
        if len(v) != 1:
            raise sweeps.law_error(name, v)
        (law, args), = v.items()
        sampled[name] = (law, args if isinstance(args, tuple) else (args,))
    elif _is_axis(current, v):
        axes[name] = v
    else:
        return True
    return False


def _skipped(key: str, v, d: dict, names) -> bool:
    """``data.key`` is not a field of this kind (``names``): True to skip it (another kind's field in
    a flat data section from before the kinds were split, or at its default), else ConfigError."""
    kinds = [c for c in DATA_KINDS.values() if key in field_names(c)]
    if not kinds:
        raise ConfigError(f"unknown config key 'data.{key}': allowed {', '.join(sorted(names))}")
    return FLAT_DATA <= set(d) or any(v == getattr(c(), key) for c in kinds)


def _data(base: DataConfig, d: dict, axes: dict, sampled: dict) -> DataConfig:
    """The data section ``d`` sets on ``base`` (its kind, or the kind ``d`` names: fields both
    kinds have carry over); lists and {law: args} become ``axes`` and ``sampled`` entries."""
    kind = d.get("kind", base.kind)
    if isinstance(kind, list):
        raise sweeps.refusal("data.kind")
    if kind != base.kind:
        new = data_config(kind)
        names = field_names(type(new))
        base = dataclasses.replace(new, **{k: getattr(base, k) for k in names if k != "kind" and hasattr(base, k)})
        for store in (axes, sampled):
            for a in [a for a in store if a.startswith("data.") and a[5:] not in names]:
                del store[a]
    names = field_names(type(base))
    fields = {}
    for key, v in d.items():
        v = _tuplify(v)
        if key not in names:
            if not _skipped(key, v, d, names):
                raise not_for_kind(f"data.{key}", kind)
        elif _place(f"data.{key}", getattr(base, key), v, axes, sampled):
            fields[key] = v
    return dataclasses.replace(base, **fields)


def _sweep(v, kw: dict) -> None:
    """The top-level "sweep" mapping: zip (lists of field names), n (draws), seed (their seed)."""
    if not isinstance(v, dict):
        raise ConfigError(f"sweep must be a mapping of {', '.join(SWEEP_KEYS)}, got {v!r}")
    for k in v:
        if k not in SWEEP_KEYS:
            raise ConfigError(f"unknown config key 'sweep.{k}': allowed {', '.join(SWEEP_KEYS)}")
    if "zip" in v:
        z = v["zip"]
        if not (isinstance(z, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in z)):
            raise invalid("sweep.zip", z, 'lists of field names, e.g. [["model.gamma_min", "model.gamma_max"]]')
        kw["zipped"] = _tuplify(z)
    for k, field, top in (("n", "draws", 10 ** 6), ("seed", "draw_seed", 2 ** 31)):
        if k in v:
            if type(v[k]) is not int or not 0 <= v[k] < top:
                raise invalid(f"sweep.{k}", v[k], f"an integer in [0, {top})")
            kw[field] = v[k]


def from_dict(d: dict, base: Config | None = None) -> Config:
    """Build a Config from a nested dict, starting from ``base`` (default: ``Config()``).

    A list in a field's place (a list of lists for a list-valued field) or in ``seeds`` becomes
    that grid axis, a {law: args} mapping that sampled axis, replacing the base's; "sweep" holds
    zip, n and seed (``sweeps``). Unknown keys and wrong types raise ConfigError naming the dotted
    key; a field that cannot be an axis is refused saying why.
    """
    base = base or Config()
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
    axes, kw = dict(base.sweep), {}
    sampled = {n: (law, args) for n, law, args in base.sampled}
    for k, v in d.items():
        if k not in TOP:
            raise ConfigError(f"unknown config key {k!r}: allowed {', '.join(sorted(TOP))}")
        if k in SECTIONS and not isinstance(v, dict):
            raise ConfigError(f"{k} must be a mapping of fields, got {v!r}")
        if k == "data":
            kw[k] = _data(base.data, v, axes, sampled)
        elif k in SECTIONS:
            sec = getattr(base, k)
            names = field_names(type(sec))
            v = {kk: vv for kk, vv in v.items() if not (f"{k}.{kk}" in RETIRED and vv == RETIRED[f"{k}.{kk}"])}
            fields = {}
            for kk, vv in v.items():
                if kk not in names:
                    raise ConfigError(f"unknown config key '{k}.{kk}': allowed {', '.join(sorted(names))}")
                if _place(f"{k}.{kk}", getattr(sec, kk), _tuplify(vv), axes, sampled):
                    fields[kk] = _tuplify(vv)
            kw[k] = dataclasses.replace(sec, **fields)
        elif k == "seeds":
            axes["seeds"] = _tuplify(v) if isinstance(v, (list, tuple)) else (v,)
        elif k == "sweep":
            _sweep(v, kw)
        else:
            kw[k] = v
    return dataclasses.replace(base, **kw, sweep=tuple(axes.items()),
                               sampled=tuple((n, law, args) for n, (law, args) in sampled.items()))


def save(cfg: Config, path) -> None:
    """Write ``cfg`` as JSON (``to_dict``), keys sorted."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load(path, base: Config | None = None) -> Config:
    """Load a JSON config file (any subset of fields; the rest from ``base`` or defaults).

    A file may name a preset with a top-level ``"preset": NAME`` key; its fields override it.
    Top-level keys starting with ``_`` (e.g. ``"_doc"``) are comments.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a file")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if isinstance(d, dict):  # top-level keys starting with "_" are comments
        d = {k: v for k, v in d.items() if not k.startswith("_")}
    if isinstance(d, dict) and "preset" in d:
        base = preset(d.pop("preset"))
    return from_dict(d, base)


def parse_value(text: str, key: str = "value"):
    """A --set value: JSON when it parses (numbers, lists, true/false), else the raw string.

    Raises ConfigError: the text opens a list or a mapping ("[", "{") that is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip()[:1] in ("[", "{"):
            raise ConfigError(f"{key}={text} is not valid JSON ({exc.msg} at character {exc.pos}): a list is "
                              "[a,b,...] and a sampled axis {\"log_uniform\":[lo,hi]}; quote the whole --set "
                              "for the shell") from None
        return text


def override(cfg: Config, assignments) -> Config:
    """Apply ``["section.field=value", ...]`` (``seeds=[0,1]`` and ``name=x`` at top level).

    All assignments are applied together and validated once, so their order does not matter.
    """
    changes: dict = {}
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"--set {a!r}: expected KEY=VALUE, e.g. data.sep_col=0.3")
        key, text = a.split("=", 1)
        parts = key.strip().split(".")
        value = parse_value(text, key.strip())
        if len(parts) == 1:
            changes[parts[0]] = value
        elif len(parts) == 2:
            sec = changes.setdefault(parts[0], {})
            if not isinstance(sec, dict):
                raise ConfigError(f"--set {a!r}: {parts[0]} is a section; set its fields as {parts[0]}.FIELD")
            sec[parts[1]] = value
        else:
            raise ConfigError(f"--set {a!r}: keys are SECTION.FIELD (e.g. data.sep_col) or a top-level field")
    return from_dict(changes, cfg) if changes else cfg


def resolve(preset_name: str | None = None, config_file=None, sets=()) -> Config:
    """The CLI's config: a preset (default '2x2'), then a file, then ``--set`` overrides."""
    cfg = preset(preset_name or "2x2") if (preset_name or not config_file) else None
    if config_file:
        cfg = load(config_file, cfg)
    return override(cfg, sets)
