"""The order of training batches (jaxconcept/data/batches.py): ``step.draw_batch`` takes exactly the
rows it took before the order moved into ``batch_indices``, those rows are ``jax.random.permutation``
read in order, and the host's ``HostBatches`` gives the same rows as the jitted function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import config as C
from jaxconcept.train.step import draw_batch, member_keys
from jaxconcept.data import batches


def old_draw_batch(tc, data, key, step):
    """``step.draw_batch`` as it was written before ``batch_indices`` (kept here to pin its numbers)."""
    n, b = data["x_train"].shape[0], tc.batch_size
    if tc.batches == "replacement":
        idx = jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, step), 1), (b,), 0, n)
        n_valid = None
    else:
        per_epoch = -(-n // b)
        epoch, start = step // per_epoch, (step % per_epoch) * b
        perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 0x7FFFFFFF), epoch), n)
        idx = jnp.take(perm, (start + jnp.arange(b)) % n)
        n_valid = jnp.minimum(b, n - start)
    return data["x_train"][idx], data["c_train"][idx], n_valid


@pytest.mark.parametrize("mode", ["epochs", "replacement"])
def test_draw_batch_takes_what_it_took_and_the_host_takes_the_same(mode):
    tc = C.TrainConfig(batch_size=8, batches=mode)
    n = 30  # 4 batches per epoch, the last one 6 real rows
    rows = jnp.arange(n, dtype=jnp.float32)[:, None]
    data = {"x_train": jnp.repeat(rows, 3, axis=1), "c_train": -rows}
    key = member_keys(7)["train"]
    new = jax.jit(lambda s: draw_batch(tc, data, key, s))
    old = jax.jit(lambda s: old_draw_batch(tc, data, key, s))
    host = batches.HostBatches(key, n, tc.batch_size, mode)
    for step in range(11):
        got, want = new(jnp.int32(step)), old(jnp.int32(step))
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
        rows, n_valid = host.rows(step)
        np.testing.assert_array_equal(rows, np.asarray(got[0][:, 0], np.int64))
        assert n_valid == (8 if got[2] is None else int(got[2]))


def test_epochs_read_the_epoch_permutation_in_order():
    key, n, b = jax.random.PRNGKey(3), 21, 5
    per_epoch = -(-n // b)
    for epoch in range(3):
        rows = [batches.batch_indices(key, jnp.int32(epoch * per_epoch + j), n, b, "epochs") for j in range(per_epoch)]
        read = np.concatenate([np.asarray(idx)[: int(nv)] for idx, nv in rows])
        perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, batches.EPOCH_STREAM), epoch), n)
        np.testing.assert_array_equal(read, perm)
        np.testing.assert_array_equal(np.asarray(rows[-1][0])[1:], np.asarray(perm)[:b - 1])  # padding: the start
