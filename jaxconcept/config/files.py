"""Configs as JSON-ready dicts, files and ``--set`` overrides.

In a dict (a file, a run's ``config.json``) a sweep is written where its fields are: a list of
values in ``data.sep_col``, ``data.sep_size`` (a list of lists in ``data.m``, ``data.s``,
``data.attributes``) and the list ``seeds``; reading turns them into ``Config.sweep`` axes.
Files written before the data kinds had their own classes list every kind's fields in one
``data`` section: there the other kinds' fields are skipped; elsewhere a field of another kind
is an error (unless at its default).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxconcept.config.checks import ConfigError, field_names, untuple
from jaxconcept.config.presets import preset
from jaxconcept.config.sections import DATA_KINDS, SWEEP_FIELDS, Config, DataConfig, data_config, not_for_kind

SECTIONS = ("data", "model", "train", "eval")
TOP = (*SECTIONS, "seeds", "name")
# the one data section of config.json files written before the data kinds had their own classes
FLAT_DATA = frozenset({
    "kind", "concepts", "values", "sep_col", "sep_size", "image_size", "blur_sigma", "pixel_noise", "dim", "perdim",
    "m", "s", "normalize", "dim_nuisance", "nuisance", "cond_mode", "cond_noise", "attributes", "source", "data_dir",
    "crop", "augment", "jitter", "held_out", "train_classes", "masked", "n_per_class", "val_frac", "n_test"})


# fields that are gone, with the one value a run's config.json may still hold for them (read and dropped)
RETIRED = {"train.scan_unroll": 0}  # the training loop's length is traced now: a while loop, not unrolled


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def to_dict(cfg: Config) -> dict:
    """JSON-ready nested dict (tuples become lists; each sweep axis stands in its field's place)."""
    axes = dict(cfg.sweep)
    out = {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}
    out["data"].update({a[5:]: v for a, v in axes.items() if a.startswith("data.")})
    out = {s: {k: untuple(v) for k, v in d.items()} for s, d in out.items()}
    return {**out, "seeds": list(cfg.seeds), "name": cfg.name}


def _is_axis(base: DataConfig, key: str, v) -> bool:
    """``v`` lists values for the sweep field ``key`` (a list of lists for a list-valued field)."""
    if f"data.{key}" not in SWEEP_FIELDS or not isinstance(v, tuple):
        return False
    return not isinstance(getattr(base, key), tuple) or (bool(v) and all(isinstance(x, tuple) for x in v))


def _skipped(key: str, v, d: dict, names) -> bool:
    """``data.key`` is not a field of this kind (``names``): True to skip it (another kind's field in
    a flat data section from before the kinds were split, or at its default), else ConfigError."""
    kinds = [c for c in DATA_KINDS.values() if key in field_names(c)]
    if not kinds:
        raise ConfigError(f"unknown config key 'data.{key}': allowed {', '.join(sorted(names))}")
    return FLAT_DATA <= set(d) or any(v == getattr(c(), key) for c in kinds)


def _data(base: DataConfig, d: dict, axes: dict) -> DataConfig:
    """The data section ``d`` sets on ``base`` (its kind, or the kind ``d`` names: fields both
    kinds have carry over); sweep fields given as lists become ``axes`` entries."""
    kind = d.get("kind", base.kind)
    if kind != base.kind:
        new = data_config(kind)
        names = field_names(type(new))
        base = dataclasses.replace(new, **{k: getattr(base, k) for k in names if k != "kind" and hasattr(base, k)})
        for a in [a for a in axes if a.startswith("data.") and a[5:] not in names]:
            del axes[a]
    names = field_names(type(base))
    fields = {}
    for key, v in d.items():
        v = _tuplify(v)
        if key not in names:
            if not _skipped(key, v, d, names):
                raise not_for_kind(f"data.{key}", kind)
        elif _is_axis(base, key, v):
            axes[f"data.{key}"] = v
        else:
            fields[key] = v
            axes.pop(f"data.{key}", None)
    return dataclasses.replace(base, **fields)


def from_dict(d: dict, base: Config | None = None) -> Config:
    """Build a Config from a nested dict, starting from ``base`` (default: ``Config()``).

    A list in a sweep field (``SWEEP_FIELDS``) or ``seeds`` becomes that sweep axis, replacing
    the base's. Unknown keys and wrong types raise ConfigError naming the dotted key.
    """
    base = base or Config()
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
    axes, kw = dict(base.sweep), {}
    for k, v in d.items():
        if k not in TOP:
            raise ConfigError(f"unknown config key {k!r}: allowed {', '.join(sorted(TOP))}")
        if k in SECTIONS and not isinstance(v, dict):
            raise ConfigError(f"{k} must be a mapping of fields, got {v!r}")
        if k == "data":
            kw[k] = _data(base.data, v, axes)
        elif k in SECTIONS:
            names = field_names(type(getattr(base, k)))
            v = {kk: vv for kk, vv in v.items() if not (f"{k}.{kk}" in RETIRED and vv == RETIRED[f"{k}.{kk}"])}
            for kk in v:
                if kk not in names:
                    raise ConfigError(f"unknown config key '{k}.{kk}': allowed {', '.join(sorted(names))}")
            kw[k] = dataclasses.replace(getattr(base, k), **{kk: _tuplify(vv) for kk, vv in v.items()})
        elif k == "seeds":
            axes["seeds"] = _tuplify(v) if isinstance(v, (list, tuple)) else (v,)
        else:
            kw[k] = v
    return dataclasses.replace(base, **kw, sweep=tuple(axes.items()))


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


def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, lists, true/false), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
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
        value = parse_value(text)
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
