"""Orbax checkpoints of a (stacked) train state: save, and restore the newest readable one.

A step that fails to restore (damaged files, an emptied directory, a write cut short) is moved
aside to ``<directory>.bad/<step>[-n]`` — kept for inspection, reported in one line — and the
manager is rebuilt, so the intact earlier steps restore and the next save of that step succeeds.

The directory is a local path or a bucket (``gs://``: orbax writes the arrays through
tensorstore's own GCS client, and the step's files through etils.epath). Orbax's INFO logging of
every save is silenced only while orbax is called (``_quiet``); nothing changes on import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxconcept import rundir, store


@contextlib.contextmanager
def _quiet():
    """Orbax logs every save and restore at INFO through absl's logger: raised to ERROR while
    orbax runs, then put back as it was."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        absl.setLevel(level)


def _dir(directory):
    d = store.path(directory)
    return d.absolute() if store.is_local(d) else d


def manager(directory, keep: int) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the ``keep`` newest steps under ``directory``."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    with _quiet():
        return ocp.CheckpointManager(_dir(directory), options=opts, item_handlers=ocp.StandardCheckpointHandler())


def _fields(tree) -> set:
    """The top-level field names of a state (a dict, a dataclass or orbax's tree metadata)."""
    if hasattr(tree, "keys"):
        return set(tree.keys())
    return {f.name for f in dataclasses.fields(tree)}


def check_layout(mngr: ocp.CheckpointManager, step: int, like) -> None:
    """Refuse a checkpoint whose train state has other fields than ``like`` (one written by an
    earlier jaxconcept, e.g. with a per-leaf optimiser state), instead of treating it as damaged.

    Raises rundir.RunDirError naming both layouts and what still works."""
    try:
        with _quiet():
            got = _fields(mngr.item_metadata(step))
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore that follows reports it
        return
    want = _fields(like)
    if got != want:
        raise rundir.RunDirError(
            f"the checkpoint at step {step} in {mngr.directory} holds a train state with the fields "
            f"{', '.join(sorted(got))}, not this version's {', '.join(sorted(want))} (it was written by an earlier "
            "jaxconcept); its samples and parameters stay readable by `jaxconcept analyze` and `elicit`; to train "
            "further, use the version that wrote it, or start a new run directory")


def _as_saved(mngr: ocp.CheckpointManager, step: int, abstract):
    """``abstract`` with its per-member settings (``hyper``, a dict of [M] leaves) keyed as checkpoint
    ``step`` holds them. They are the config's, set again from it after restoring (``loop``), so a
    checkpoint written when fewer settings were per-member still restores."""
    hyper = getattr(abstract, "hyper", None)
    try:
        with _quiet():
            saved = list(mngr.item_metadata(step)["hyper"].keys())
    except Exception:  # noqa: BLE001 - no such field or unreadable metadata: the restore that follows reports it
        return abstract
    if not hyper or set(saved) == set(hyper):
        return abstract
    like = next(iter(hyper.values()))
    return abstract.replace(hyper={k: like for k in saved})


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    with _quiet():
        mngr.save(int(step), args=ocp.args.StandardSave(state), force=True)
        mngr.wait_until_finished()


def move_aside(directory, step: int, why: str) -> "epath.Path":
    """Move checkpoint ``step`` to ``<directory>.bad/`` (process 0 only) and say so in one line."""
    src = _dir(directory) / str(step)
    bad = store.path(f"{_dir(directory)}.bad")
    dst = bad / str(step)
    n = 1
    while dst.exists():
        dst, n = bad / f"{step}-{n}", n + 1
    if jax.process_index() == 0 and src.exists():
        store.move_tree(src, dst)
    rundir.warn(f"checkpoint at step {step} is unreadable ({why}); moved to {dst}")
    return dst


def _barrier(name: str) -> None:
    """Every process waits here (after process 0 moved something on the shared file system)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _incomplete_steps(directory) -> list[int]:
    """Step directories without orbax's metadata file, or (in a bucket, where orbax writes a step
    in place) without its commit marker: empty, or cut short before orbax finished them."""
    if not directory.is_dir():
        return []
    with _quiet():
        return [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and not (
            (p / "_CHECKPOINT_METADATA").is_file() and ocp.utils.is_checkpoint_finalized(p))]


def latest_step(directory) -> int:
    """The newest step under ``directory`` that orbax finished writing (-1: none), read from the
    directory alone (nothing restored)."""
    directory = _dir(directory)
    if not directory.is_dir():
        return -1
    with _quiet():
        return max((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and (
            p / "_CHECKPOINT_METADATA").is_file() and ocp.utils.is_checkpoint_finalized(p)), default=-1)


def restore_latest(directory, keep: int, like):
    """Restore the newest checkpoint under ``directory`` that reads back whole.

    Steps that fail are moved aside (``move_aside``) and the previous one is tried.

    Args:
      directory: the checkpoint directory; keep: the manager's ``max_to_keep``.
      like: a state (or abstract state) giving the structure, shapes, dtypes and shardings.
    Returns:
      ``(manager, step, state)``; step and state are None when nothing restores. The manager is
      the one to save with (rebuilt after any step was moved aside). A state's ``hyper`` is keyed
      as the checkpoint holds it (``_as_saved``): set it from the config.
    """
    directory = _dir(directory)
    for step in _incomplete_steps(directory):
        move_aside(directory, step, "incomplete: no checkpoint metadata")
    _barrier("jaxconcept-checkpoint-scan")
    mngr = manager(directory, keep)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for step in sorted(mngr.all_steps(), reverse=True):
        check_layout(mngr, step, like)
        try:
            with _quiet():
                state = mngr.restore(step, args=ocp.args.StandardRestore(_as_saved(mngr, step, abstract)))
                jax.block_until_ready(state)
            return mngr, step, state
        except Exception as exc:  # noqa: BLE001 - any failure to read means "try the previous one"
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            move_aside(directory, step, f"{type(exc).__name__}: {first}")
            _barrier(f"jaxconcept-checkpoint-{step}")
            with _quiet():
                mngr.close()
            mngr = manager(directory, keep)
    return mngr, None, None


# --------------------------------------------------------------------------------------------
# A stacked state padded to the mesh: only the real members are checkpointed
# --------------------------------------------------------------------------------------------
def save_real(mngr: ocp.CheckpointManager, step: int, state, n_real: int) -> None:
    """Checkpoint the first ``n_real`` rows (the real members) of a stacked ``state`` whose
    leaves lead with a padded model axis; the padding depends on the device count, so a run
    resumes on other devices. Every process calls this."""
    real = state if jax.tree.leaves(state)[0].shape[0] == n_real else jax.tree.map(lambda a: a[:n_real], state)
    save(mngr, step, real)


def restore_padded(directory, keep: int, like, n_real: int, place):
    """Restore the newest readable checkpoint of ``n_real`` members into the padded layout of
    ``like`` (leaves [M_padded, ...]): the real rows are read on the host, the padding rows are
    copies of the last member, and ``place(numpy array) -> array`` puts each leaf where ``like``'s
    is (e.g. sharded over the mesh).

    Returns (manager, step, state) as ``restore_latest``."""
    import numpy as np

    n_pad = jax.tree.leaves(like)[0].shape[0] - n_real
    if n_pad == 0:
        return restore_latest(directory, keep, like)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n_real, *a.shape[1:]), a.dtype, sharding=cpu), like)
    mngr, step, real = restore_latest(directory, keep, abstract)
    if real is None:
        return mngr, None, None

    def pad(a):
        a = np.asarray(a)
        return place(np.concatenate([a, np.repeat(a[-1:], n_pad, axis=0)]))
    return mngr, step, jax.tree.map(pad, real)
