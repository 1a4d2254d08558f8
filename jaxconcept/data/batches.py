"""The order of training batches: one function for the engine's on-device draw (``step.draw_batch``)
and for the host feed of host-fed kinds, so that a member sees the same batches either way.

``batch_indices`` is written with jax ops and runs inside the jitted step. ``HostBatches`` runs the
same function on the host's CPU (jax's CPU backend: threefry bits and a stable sort, the same on
every backend), computing each epoch's permutation once instead of at every step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EPOCH_STREAM = 0x7FFFFFFF  # fold_in tag of the epoch-permutation stream (steps stay below 2**31)


def epoch_permutation(key, epoch, n: int):
    """The order in which epoch ``epoch`` reads a training set of ``n`` examples: [n] int32, a
    ``jax.random.permutation`` keyed by (key, EPOCH_STREAM, epoch)."""
    return jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, EPOCH_STREAM), epoch), n)


def batch_indices(key, step, n: int, batch_size: int, batches: str, perm=None):
    """Rows of a training set of ``n`` examples in the batch of ``step``.

    ``batches="epochs"`` (the reference): the set is reshuffled every epoch
    (``epoch_permutation``) and read in order without replacement; the last batch of an epoch is
    short, so it is padded with rows from the epoch's start and its real size returned.
    "replacement": B independent uniform draws keyed by (key, step, 1).

    Args:
      key: the member's train key [2] uint32; step: the global step (int32, may be traced).
      perm: the epoch's permutation when the caller holds it (the host feed); else computed here.
    Returns:
      (idx [B] int32, n_valid: real rows, the first ones; None with "replacement" = all B).
    """
    b = batch_size
    if batches == "replacement":
        return jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, step), 1), (b,), 0, n), None
    per_epoch = -(-n // b)
    epoch, start = step // per_epoch, (step % per_epoch) * b
    if perm is None:
        perm = epoch_permutation(key, epoch, n)
    idx = jnp.take(perm, (start + jnp.arange(b)) % n)  # rows past the epoch's end are padding
    return idx, jnp.minimum(b, n - start)


_indices = jax.jit(batch_indices, static_argnums=(2, 3, 4))
_permutation = jax.jit(epoch_permutation, static_argnums=2)


def _cpu():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # the CPU backend is switched off (JAX_PLATFORMS): the default device then
        return jax.devices()[0]


class HostBatches:
    """``batch_indices`` of one member on the host: ``rows(step) -> (idx [B] int64, n_valid int)``
    (numpy; n_valid = B with "replacement"), computed by jax on the CPU."""

    def __init__(self, key, n: int, batch_size: int, batches: str):
        self.key, self.n, self.b, self.batches = np.asarray(key, np.uint32), int(n), int(batch_size), batches
        self._perm = (None, None)  # (epoch, its permutation)

    def rows(self, step: int):
        with jax.default_device(_cpu()):
            key, perm = jnp.asarray(self.key), None
            if self.batches != "replacement":
                epoch = step // -(-self.n // self.b)
                if self._perm[0] != epoch:
                    self._perm = (epoch, _permutation(key, jnp.int32(epoch), self.n))
                perm = self._perm[1]
            idx, n_valid = _indices(key, jnp.int32(step), self.n, self.b, self.batches, perm)
            return np.asarray(idx, np.int64), self.b if n_valid is None else int(n_valid)
