"""Orbax checkpoints of a (stacked) train state: save, and restore the newest readable one."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save at INFO


def manager(directory, keep: int) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the ``keep`` newest steps under ``directory``."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    mngr.save(int(step), args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like):
    """Restore the newest checkpoint that reads back whole; a corrupt or partial one is skipped with a
    warning and the previous one is tried. Returns ``(step, state)`` or ``(None, None)``.

    ``like`` is a state (or abstract state) giving the structure, shapes, dtypes and shardings.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
            jax.block_until_ready(state)
            return step, state
        except Exception as exc:  # noqa: BLE001 - any failure to read means "try the previous one"
            warnings.warn(f"checkpoint at step {step} is unreadable ({type(exc).__name__}: {exc}); "
                          "falling back to the previous one", stacklevel=2)
    return None, None
