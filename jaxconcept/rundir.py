"""The run directory: its on-disk layout and its files' readers and writers (``runs.Run`` reads a
whole run through them).

    RUN_DIR/config.json           the full resolved (sweep) config, written once
    RUN_DIR/members.json          one entry per member: index, seed, its sweep values, signals
    RUN_DIR/metrics.jsonl         one JSON object per log point: step, train_loss[M], val_loss[M],
                                  test_loss[M], frozen[M], steps_per_s
    RUN_DIR/samples/step_XXXXXXX.npz
                                  samples [M, n_classes, n_samples, *x_shape] (float32, as
                                  computed; float16 with eval.sample_dtype), prompts [M, n_classes,
                                  n_samples, cond_dim] (float32), step, rounding_error (float16 only)
    RUN_DIR/params/step_XXXXXXX.npz
                                  stacked parameters (leading member axis) at each evaluation point
                                  (``save_tree``: an entry per leaf, named by its key path)
    RUN_DIR/tensorboard/          with train.tensorboard: the scalars of metrics.jsonl as TensorBoard
                                  events (metrics.jsonl stays the record)
    RUN_DIR/checkpoints/          orbax train-state checkpoints (resume); checkpoints/config.json
                                  a second copy of the config, so a lost config.json is noticed;
                                  checkpoints/segment.json the loss sum of the interval a signal
                                  cut short (step, steps, dtype, loss_sum[M]: ``loop``)
    RUN_DIR/checkpoints.bad/      checkpoints that failed to restore, moved aside (kept)
    RUN_DIR/.lock                 held by the training process (fcntl; in a bucket a lock object);
                                  names its pid and host; removed at exit

A sweep of several groups (``config.groups``: members that need programs of their own) keeps
config.json, members.json (each member's "group") and the analysis at RUN_DIR, and each group's
metrics.jsonl, samples/, params/ and checkpoints/ (its members' rows, in member order) in
RUN_DIR/groups/<g>/ (``group_dir``); ``jaxconcept.runs`` reads them as one run.

``runs.Run`` is the one reader of a finished (or growing) run: config, members, metrics, samples,
parameters and the analysis files. Before training, ``runconfig.prepare`` checks the directory
can hold the run and ``runconfig.write_run_files`` writes config.json and members.json.

RUN_DIR is a local path or a bucket (``gs://``): every file goes through ``store`` (etils.epath).
Every file is written whole or not at all (``store.atomic``: locally a temporary file, flushed,
fsynced and renamed over the final name; in a bucket one object write). Readers ignore temporary
files; ``metrics.jsonl`` gets one record at a time (``store.append_line``) and a half-written
last line is dropped when read. Files are readable as the umask allows (0644 by default).
"""
from __future__ import annotations

import io
import json
import math
import re

import numpy as np

from jaxconcept import config as C, data as D, store
from jaxconcept.store import RunDirError, RunWarning, atomic, lock, path, warn  # noqa: F401 - the run directory's API

_STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


def clean_json(obj):
    """``obj`` with NaN and infinities replaced by None, so it is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return clean_json(obj.item())
    return obj


def write_json(path, obj, indent: int | None = 1) -> None:
    """Write standard JSON (no NaN/Infinity literals) atomically."""
    text = json.dumps(clean_json(obj), indent=indent, allow_nan=False)
    with atomic(path) as f:
        f.write(text + "\n")


def read_json(path, what: str):
    """Parse a JSON file, or raise RunDirError naming it and what to do."""
    p = store.path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{p} is missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{p} is unreadable ({what}): {exc}; delete it to have it written again") from None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _step_file(run_dir, sub, step):
    return store.path(run_dir) / sub / f"step_{int(step):07d}.npz"


def group_dir(run_dir, g: int, n_groups: int):
    """Where group ``g`` of a run of ``n_groups`` groups keeps its metrics.jsonl, samples/, params/
    and checkpoints/: RUN_DIR itself for a run of one group, else RUN_DIR/groups/<g>."""
    run_dir = store.path(run_dir)
    return run_dir if n_groups == 1 else run_dir / "groups" / str(g)


def load_config(run_dir) -> C.Config:
    p = store.path(run_dir) / "config.json"
    if not p.parent.is_dir():
        raise RunDirError(f"{run_dir} is not a directory (give a run directory written by `jaxconcept train`)")
    if not p.exists():
        raise RunDirError(f"{run_dir} is not a run directory: no config.json (run `jaxconcept train` first)")
    d = read_json(p, "the run's config")
    try:
        return C.from_dict(d)
    except C.ConfigError as exc:
        raise RunDirError(f"{p} does not hold a valid config ({exc})") from None


def load_members(run_dir) -> list[dict]:
    d = read_json(store.path(run_dir) / "members.json", "the members of the sweep; `jaxconcept train` rewrites it")
    if not isinstance(d, list) or not all(isinstance(m, dict) and "index" in m for m in d):
        raise RunDirError(f"{store.path(run_dir) / 'members.json'} is not a list of members; delete it and run "
                          "`jaxconcept train` on this directory to have it written again")
    return d


def load_metrics(run_dir) -> list[dict]:
    """Every complete record of metrics.jsonl (a half-written or garbled line is skipped)."""
    p = store.path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_bytes().decode(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            out.append(r)
    return out


def steps_with(run_dir, sub="samples") -> list[int]:
    """Steps for which RUN_DIR/<sub>/step_*.npz exists, increasing (temporary files ignored)."""
    d = store.path(run_dir) / sub
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _STEP_FILE.match(p.name)))


def _load_npz(p, what: str):
    try:
        f = np.load(io.BytesIO(p.read_bytes()))  # read whole: a bucket's objects are not files
        f.files  # noqa: B018 - reads the zip directory: fails here on a damaged file
        return f
    except FileNotFoundError:
        raise RunDirError(f"{p} is missing ({what})") from None
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds on damaged files
        raise RunDirError(f"{p} is damaged ({what}: {type(exc).__name__}: {exc}); delete it and re-run "
                          "`jaxconcept train` on this directory to write it again (training resumes "
                          "from its checkpoints)") from None


def load_samples(run_dir, step) -> dict:
    p = _step_file(run_dir, "samples", step)
    with _load_npz(p, f"samples at step {step}") as f:
        try:
            return {"samples": f["samples"].astype(np.float32), "prompts": f["prompts"], "step": int(f["step"])}
        except Exception as exc:  # noqa: BLE001
            raise RunDirError(f"{p} is damaged ({type(exc).__name__}: {exc}); delete it and re-run "
                              "`jaxconcept train` on this directory") from None


def load_tree(path, like, what: str):
    """A pytree written by ``save_tree``, restored into the structure of ``like`` (arrays or
    ShapeDtypeStructs; every leaf's shape is checked) as numpy arrays.

    Raises RunDirError: the file is missing, damaged, or holds another structure or shapes."""
    import jax

    p = store.path(path)
    with _load_npz(p, what) as f:
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        try:
            leaves = [f[jax.tree_util.keystr(k)] for k, _ in flat]
        except Exception as exc:  # noqa: BLE001
            raise RunDirError(f"{p} is damaged or from another model ({type(exc).__name__}: {exc}); delete it "
                              "and re-run `jaxconcept train` on this directory") from None
        for (k, want), got in zip(flat, leaves):
            if tuple(got.shape) != tuple(want.shape):
                raise RunDirError(f"{p}: {jax.tree_util.keystr(k)} has shape {got.shape}, expected {want.shape}")
        return jax.tree_util.tree_unflatten(treedef, leaves)


def load_params(run_dir, step, like):
    """Stacked parameters at ``step`` (``save_params``), restored into the structure of ``like``."""
    return load_tree(_step_file(run_dir, "params", step), like, f"parameters at step {step}")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def save_samples(run_dir, step, samples, prompts, dtype: str = "float32", tolerance: float = 0.0) -> str:
    """Write the samples and prompts of evaluation ``step``; returns the dtype the samples were stored in.

    Samples keep the precision they were computed in (float32). ``dtype="float16"`` halves the
    file, but only where rounding cannot matter: the largest rounding error is measured and, when
    it exceeds ``tolerance`` (the data's finest scale, ``data.storage_tolerance``: e.g. a float16
    step of 0.25 between 256 and 512 against a class spread of 0.05), float16 is refused and the
    samples are stored as float32 with a one-line warning. The measured error is stored beside them.
    """
    samples = np.asarray(samples, np.float32)
    extra = {}
    if dtype == "float16":
        with np.errstate(over="ignore", invalid="ignore"):
            low = samples.astype(np.float16)
            err = np.abs(low.astype(np.float32) - samples)
        finite = np.isfinite(samples)
        worst = float(np.max(np.where(finite, err, 0.0), initial=0.0))
        if np.all(np.isfinite(low) == finite) and worst <= tolerance:
            samples, extra = low, {"rounding_error": np.float32(worst)}
        else:
            worst = "an overflow" if not np.all(np.isfinite(low) == finite) else f"{worst:.3g}"
            warn(f"eval.sample_dtype='float16' refused at step {step}: rounding to float16 would move samples by "
                 f"{worst}, more than {tolerance:.3g} (the data's finest scale); stored as float32")
            dtype = "float32"
    with atomic(_step_file(run_dir, "samples", step), "wb") as f:
        np.savez(f, samples=samples, prompts=np.asarray(prompts, np.float32), step=step, **extra)
    return dtype


def save_tree(path, tree) -> None:
    """Write a pytree of arrays as one .npz, atomically: an entry per leaf, named by its path
    (``jax.tree_util.keystr``, e.g. "['net']['dense_0']['kernel']"), as numpy arrays. The one
    format of parameter files (a run's ``params/``, the probe cache); read back by ``load_tree``."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
    with atomic(path, "wb") as f:
        np.savez(f, **arrays)


def save_params(run_dir, step, params) -> None:
    """The (stacked) parameters of evaluation ``step``: RUN_DIR/params/step_XXXXXXX.npz."""
    save_tree(_step_file(run_dir, "params", step), params)


def append_metrics(run_dir, record: dict) -> None:
    """Append one record as one line (``store.append_line``: a kill leaves at most a half line,
    dropped on reading)."""
    store.append_line(store.path(run_dir) / "metrics.jsonl", json.dumps(clean_json(record), allow_nan=False) + "\n")


def reconcile_metrics(run_dir, step: int) -> list[dict]:
    """Rewrite metrics.jsonl atomically with its complete records up to ``step`` (the restored
    step; later ones will be recomputed identically). Returns the records kept."""
    keep = [r for r in load_metrics(run_dir) if r["step"] <= step]
    with atomic(store.path(run_dir) / "metrics.jsonl") as f:
        f.write("".join(json.dumps(clean_json(r), allow_nan=False) + "\n" for r in keep))
    return keep


# --------------------------------------------------------------------------------------------
# members.json
# --------------------------------------------------------------------------------------------
def member_records(cfg: C.Config, members=None, groups=None) -> list[dict]:
    """members.json: per member of ``cfg``, its index, group, data sweep settings (the keys of
    ``C.sweep_settings``), "values" (its value of every swept field, ``C.member_values``) and
    concept signals. ``members``, ``groups``: ``C.members(cfg)`` and ``C.groups(cfg)``, if at hand."""
    members = C.members(cfg) if members is None else members
    group_of = {i: g for g, idx in enumerate(C.groups(cfg, members) if groups is None else groups) for i in idx}
    return [{"index": i, "group": group_of[i], **C.sweep_settings(m), "values": C.member_values(cfg, m),
             "signal": {k: float(v) for k, v in D.concept_signal(m.data).items()}} for i, m in enumerate(members)]


def member_header(record: dict) -> dict:
    """The keys every per-member record of analysis.json and elicit.json starts with, from a
    members.json record: index, seed and the data sweep settings (``C.sweep_settings``: attributes
    for CelebA), group, values."""
    return {"index": record.get("index"), **{k: record.get(k) for k in C.sweep_settings(C.Config())},
            "group": record.get("group", 0), "values": record.get("values", {})}
