"""A run directory's config before training: comparing configs, a run growing, checking the
directory can hold the run (``prepare``) and writing config.json and members.json."""
from __future__ import annotations

import dataclasses

from jaxconcept import config as C, store
from jaxconcept.config.files import untuple
from jaxconcept.train import RunError
from jaxconcept.rundir import RunDirError, load_members, load_metrics, read_json, steps_with, write_json


def flat_dict(d: dict, prefix: str = "") -> dict:
    """A nested dict as {"section.field": value}."""
    out = {}
    for k, v in d.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diffs(old: dict, cfg: C.Config) -> list[str]:
    """Every field in which ``cfg`` differs from ``old`` (a config.json's contents), as
    "section.field: old -> new"; fields added since ``old`` was written take their defaults."""
    try:
        old = C.to_dict(C.from_dict(old))
    except (C.ConfigError, TypeError, AttributeError):
        pass
    old, new = flat_dict(old), flat_dict(C.to_dict(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def differences_from_defaults(cfg: C.Config) -> str:
    """The fields of ``cfg`` that differ from ``C.Config()`` (the data section: from the defaults of
    its own kind, e.g. ``VectorData()``), as one line of key=value."""
    mine, default = flat_dict(C.to_dict(cfg)), flat_dict(C.to_dict(C.Config()))
    default = {k: v for k, v in default.items() if not k.startswith("data.")}
    default.update({f"data.{k}": untuple(v) for k, v in dataclasses.asdict(type(cfg.data)()).items()})
    return ", ".join(f"{k}={mine[k]}" for k in sorted(mine) if mine[k] != default.get(k)) or "all defaults"


def growth(old: dict, cfg: C.Config) -> list[str]:
    """The differences of ``config_diffs`` that are not a run growing (``cfg`` resumes a run of
    ``old`` and trains it on to a larger ``train.steps``).

    A run may grow: ``train.steps`` larger, and explicit ``eval.steps`` the old ones followed by
    steps beyond the old end (with sqrt-spaced evaluation, ``eval.steps`` stays empty). Training
    does not depend on ``train.steps`` (the learning rate is constant, every draw is keyed by the
    step), so the grown run trains as a longer run would; its evaluation points are the ones
    already written and, beyond the restored step, the new config's (``C.eval_steps``): a pure
    function of the config and the start, as resuming needs.

    Raises RunError: ``train.steps`` shrinks and nothing else differs (one line)."""
    diffs = config_diffs(old, cfg)
    try:
        was = C.from_dict(old)
    except (C.ConfigError, TypeError, AttributeError):
        return diffs
    before, after = was.train.steps, cfg.train.steps
    extended = list(was.eval.steps) == [s for s in cfg.eval.steps if s <= before]
    allowed = {"train.steps"} | ({"eval.steps"} if extended else set())
    others = [d for d in diffs if d.split(":")[0] not in allowed]
    if after < before and not others:
        raise RunError(f"train.steps={after} is less than the {before} steps this run directory was trained "
                       f"to: a run may grow, not shrink; use another --out, or train.steps >= {before}")
    return diffs if after < before else others


def prepare(cfg: C.Config, run_dir) -> None:
    """Check ``run_dir`` can hold this run (nothing written yet): a directory or nothing, under a
    writable directory, holding no other run (the same run grown is allowed: ``growth``).

    Raises RunError: a file is in the way, the directory holds a run of another config (or of
    more steps), or training files without a config."""
    run_dir = store.path(run_dir)
    for parent in [run_dir, *run_dir.parents] if store.is_local(run_dir) else []:
        if parent.exists() and not parent.is_dir():
            raise RunError(f"--out {run_dir}: {parent} is a file, not a directory")
        if parent.exists():
            break
    for name, what in (("config.json", "the run's config"), ("checkpoints/config.json", "a copy of the config")):
        p = run_dir / name
        if p.exists():
            try:
                old = read_json(p, what)
            except RunDirError as exc:
                raise RunError(str(exc)) from None
            diffs = growth(old, cfg) if isinstance(old, dict) else ["(not a config)"]
            if diffs:
                raise RunError(f"{run_dir} holds a run with a different config ({'; '.join(diffs)}); "
                               "use another --out, or the same config to resume")
    trained = any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")) or any(
        steps_with(run_dir, sub) for sub in ("samples", "params")) or bool(load_metrics(run_dir)) or (
        run_dir / "groups").exists()
    if trained and not (run_dir / "config.json").exists():
        if not (run_dir / "checkpoints" / "config.json").exists():
            raise RunError(f"{run_dir} holds training files but no config.json, so the config they were "
                           "trained with is unknown; restore config.json, or use another --out")


def write_run_files(run_dir, cfg: C.Config, members: list[dict]) -> None:
    """config.json (both copies: when missing, or the run grew) and members.json (``members``,
    one record per member, when missing, unreadable or of another length). Process 0 only."""
    run_dir = store.path(run_dir)
    for p in (run_dir / "config.json", run_dir / "checkpoints" / "config.json"):
        try:
            same = p.exists() and not config_diffs(read_json(p, "the run's config"), cfg)
        except RunDirError:
            same = False
        if not same:
            write_json(p, C.to_dict(cfg), indent=2)
    try:
        ok = len(load_members(run_dir)) == len(members)
    except RunDirError:
        ok = False
    if not ok:
        write_json(run_dir / "members.json", members)
