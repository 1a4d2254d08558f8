"""The image and attribute probes' network and its training (``probe`` builds the probes on it).

``ProbeNet`` is a small convolutional classifier with one softmax head per concept; ``fit`` trains
it on fresh batches from a sampler until every concept of every class reaches a bar on held-out
test sets. Pure functions of the network and its parameters: nothing is cached here.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

_NEG = -1e9  # logit of padding values (concepts with fewer values than the widest one)


class ProbeNet(nn.Module):
    """Conv classifier: stages of ``depth`` x (conv3x3, GELU) with a 2x2 average pool between
    stages, a global mean pool, a hidden layer, then one head per concept.

    Returns logits [B, n_concepts, max(values)]; values a concept lacks get a large negative logit.
    """

    values: tuple
    widths: tuple = (32, 32, 32)
    depth: int = 1  # convs per stage; 1 keeps CPU training to seconds and is enough for G
    hidden: int = 64

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C] in about [0, 1]
        h = 2.0 * x - 1.0
        for i, w in enumerate(self.widths):
            for j in range(self.depth):
                h = nn.gelu(nn.Conv(w, (3, 3), name=f"stage_{i}_conv_{j}")(h))
            if i < len(self.widths) - 1:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = jnp.mean(h, axis=(1, 2))  # [B, w]: pooled, so object position does not matter
        h = nn.gelu(nn.Dense(self.hidden, name="hidden")(h))  # [B, hidden]
        nv = max(self.values)
        logits = []
        for i, v in enumerate(self.values):
            li = nn.Dense(v, name=f"head_{i}")(h)  # [B, v]
            logits.append(jnp.pad(li, ((0, 0), (0, nv - v)), constant_values=_NEG))
        return jnp.stack(logits, axis=1)  # [B, n_concepts, nv]


def init(net: ProbeNet, x_shape: tuple, key) -> dict:
    """ProbeNet parameters for inputs of shape ``x_shape`` (one example, no batch axis)."""
    return net.init(key, jnp.zeros((1, *x_shape), jnp.float32))["params"]


def loss_fn(net: ProbeNet, params, x, y):
    """Mean over concepts and batch of the softmax cross-entropy; y: [B, n_concepts] value indices."""
    logits = net.apply({"params": params}, x)  # [B, n_concepts, nv]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make_train_step(net: ProbeNet, sample_fn: Callable, class_values, n_classes: int, *,
                    batch_size: int, tx: optax.GradientTransformation):
    """A jitted probe update on a fresh batch of G.

    Called from a Python loop rather than scanned: XLA:CPU runs convolutions inside ``lax.scan``
    some 30x slower than the same step jitted on its own (measured on jax 0.10).

    Args:
      sample_fn: ``(key, labels [B]) -> x [B, *x_shape]``, G's images of the given classes.
      class_values: [n_classes, n_concepts] value index of each class.
    Returns:
      ``step(params, opt_state, key) -> (params, opt_state, loss)``.
    """
    table = jnp.asarray(class_values)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, key):
        k_lab, k_x = jax.random.split(key)
        labels = jax.random.randint(k_lab, (batch_size,), 0, n_classes)  # all classes, held-out too
        x = sample_fn(k_x, labels)  # [B, *x_shape]
        loss, grads = jax.value_and_grad(lambda p: loss_fn(net, p, x, table[labels]))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    return step


@functools.lru_cache(maxsize=None)
def _probs_fn(values: tuple, widths: tuple, depth: int):
    """One jitted forward pass per architecture, so repeated predictions do not recompile."""
    net = ProbeNet(values, widths, depth)
    return jax.jit(lambda p, xb: jax.nn.softmax(net.apply({"params": p}, xb), axis=-1))


def net_probs(net: ProbeNet, params, x, batch: int = 512) -> np.ndarray:
    """Per-concept value probabilities of x [N, *x_shape]: [N, n_concepts, max(values)] float32,
    in batches of ``batch`` (one compiled shape)."""
    fn = _probs_fn(tuple(net.values), tuple(net.widths), net.depth)
    out = []
    for i in range(0, len(x), batch):
        xb = np.asarray(x[i:i + batch], np.float32)
        pad = batch - len(xb) if len(x) > batch else 0  # one batch shape for every chunk: one compile
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), np.float32)]) if pad else xb
        out.append(np.asarray(fn(params, jnp.asarray(xb)))[: batch - pad])
    return np.concatenate(out, axis=0)


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """[N, n_concepts] bool and [N] labels -> [n_classes, n_concepts] mean correctness."""
    return np.stack([correct[labels == c].mean(axis=0) for c in range(n_classes)])


def fit(net: ProbeNet, sample_fn: Callable, class_values, key, test_x, test_y, *, bar: float = 0.99,
        max_steps: int = 3000, chunk: int = 50, batch_size: int = 64, lr: float = 2e-3, criterion=None):
    """Train a ProbeNet until every concept of every class reaches ``bar`` on the test set.

    Args:
      net: the probe network; sample_fn: ``(key, labels) -> x`` (G, jittable).
      class_values: [n_classes, n_concepts] value index per class.
      key: PRNG key. test_x: [N, *x_shape]; test_y: [N] class labels (all classes).
      bar: accuracy to reach; max_steps: give up after this many steps (rounded up to ``chunk``,
        the number of steps between accuracy checks).
      criterion: [n_classes, n_concepts] accuracy -> the number held against ``bar`` (default: its
        minimum, every concept of every class).
    Returns:
      (params, accuracy [n_classes, n_concepts], steps trained, met: bool).
    """
    params, (acc,), steps, met = fit_all(net, sample_fn, class_values, key, [(test_x, test_y)], bar=bar,
                                         max_steps=max_steps, chunk=chunk, batch_size=batch_size, lr=lr,
                                         criterion=criterion)
    return params, acc, steps, met


def fit_all(net: ProbeNet, sample_fn: Callable, class_values, key, tests, *, bar: float = 0.99,
            max_steps: int = 3000, chunk: int = 50, batch_size: int = 64, lr: float = 2e-3, criterion=None):
    """``fit`` held against several test sets ``tests`` = [(x, y), ...] (e.g. typical and corner
    draws): training stops when every one meets the bar. Returns (params, [accuracy per test
    set], steps trained, met)."""
    class_values = np.asarray(class_values)
    n_classes = class_values.shape[0]
    params = init(net, tuple(tests[0][0].shape[1:]), jax.random.fold_in(key, 0))
    tx = optax.adam(lr)
    opt = tx.init(params)
    step = make_train_step(net, sample_fn, class_values, n_classes, batch_size=batch_size, tx=tx)
    steps, accs = 0, [np.zeros(class_values.shape) for _ in tests]
    while steps < max_steps:
        for _ in range(min(chunk, max_steps - steps)):
            params, opt, _ = step(params, opt, jax.random.fold_in(key, 1 + steps))
            steps += 1
        accs = [per_class_accuracy(net_probs(net, params, x).argmax(-1) == class_values[y], y, n_classes)
                for x, y in tests]
        if all((criterion or np.min)(a) >= bar for a in accs):
            return params, accs, steps, True
    return params, accs, steps, False
