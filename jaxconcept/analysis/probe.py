"""The concept probe: the measuring instrument that maps a generated sample to concept space.

Three kinds, one interface (``probe_for(data_cfg) -> Probe``, ``predict``, ``coordinates``,
``correct``):

* images (docs/study.md A3): a small convolutional classifier (``ProbeNet``: three conv stages of width 32
  with average pooling, a globally pooled feature and one softmax head per concept), trained with
  optax on fresh images of G drawn every step from *all* classes, held-out ones included — it
  measures the generator, it is not the model under study. Half of every batch is drawn at the
  corners of the class boxes (``data.corner_sample``: every colour channel, size and background
  channel at an end of its range), where a probe trained on typical draws errs most. Training
  runs in rounds until the probe reaches ``bar`` (99 %) accuracy on every concept of every class
  of two fresh test sets, typical draws and corner draws, or gives up after ``max_steps`` and
  raises ``ProbeError``: an analysis with an unreliable instrument must not run. Trained probes
  are cached per data config.
* celeba (docs/study.md A5): the same ProbeNet (wider, two convs per stage), one softmax head per
  attribute, trained on the evaluation split of the photographs (every combination, the held-out
  one included; images the diffusion model never sees) with the training data's flips and colour
  jitter; it must reach ``CELEBA_BAR`` (0.85; ``bar``, ``--probe-bar`` on the command line) accuracy on
  each attribute, averaged over the combinations, on the split's test part (``_celeba_probe``).
* vector (docs/study.md A6): exact, nothing to train. Along each concept axis a sample takes the value
  whose grid coordinate is nearest — a classification, as the image probe's most probable value
  is. A sample is correct for a prompt when each concept's nearest value is the prompted one.
  With ``band`` = k > 0 (``eval.vector_band``) a value also requires the coordinate to lie within
  k standard deviations of it (the reference's 3·s acceptance: an "in distribution" requirement;
  outside every value's band a sample has no value). The band alone is not a classification:
  when k·s > m/2 a sample nearer the wrong value still counts as correct, so small separations
  look easy — which is why it is no longer the default.

The network and its training are ``probe_net`` (``ProbeNet``, ``fit``); this module builds,
checks and caches the probes (``probe_for(cache=...)``, ``--probe-cache`` on the command line;
parameters in ``rundir.save_tree``'s format, the one of a run's parameter files).

Concept-space coordinates are in [0, 1] per concept: for images the probability-weighted value
index divided by (n_values - 1) — for two values, P(second value), e.g. P(blue), P(small); for
vectors the position along the concept axis, rescaled so the first value sits at 0, the last at 1.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import data as D, rundir
from jaxconcept.analysis.probe_net import ProbeNet, fit, fit_all, init, net_probs, per_class_accuracy

__all__ = ["CELEBA_BAR", "PROBE_VERSION", "Probe", "ProbeError", "ProbeNet", "cache_key", "class_value_table",
           "coordinates", "correct", "fit", "fit_all", "init", "per_class_accuracy", "predict", "probe_for"]

PROBE_VERSION = 2  # bump when ProbeNet or its training changes: old cache entries are ignored
VECTOR_BAR = 0.9  # the exact vector probe's bar on G's own samples (overlapping classes lower it)

CELEBA_BAR = 0.85  # per-attribute accuracy the CelebA probe must reach (real attributes reach about 0.9)
CELEBA_WIDTHS = (32, 64, 128, 256)  # ProbeNet stages for photographs, two convs each; as many as pool to 8x8


class ProbeError(RuntimeError):
    """The probe cannot be trusted (it missed the accuracy bar): the analysis refuses to run."""


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Probe:
    """A trained (images) or exact (vector) concept probe for one data config."""

    kind: str  # "images" | "vector" | "celeba"
    concepts: tuple  # concept names
    values: tuple  # values per concept
    net_params: Any = None  # images: ProbeNet parameters
    widths: tuple = (32, 32, 32)  # images: ProbeNet widths
    depth: int = 1  # images: convs per ProbeNet stage
    value_pos: Any = None  # vector: [n_concepts, max_values] grid coordinate of each value
    std: Any = None  # vector: [n_concepts] per-axis standard deviation
    band: float = 0.0  # vector: a value also needs |x - value| <= band std (0 = nearest value only)
    accuracy: Any = None  # [n_classes, n_concepts] accuracy on a fresh test set when accepted
    corner_accuracy: Any = None  # images: [n_classes, n_concepts] accuracy on draws at the class boxes' corners
    key: str = ""  # the cache key (data-config hash)

    @property
    def n_values(self) -> int:
        return max(self.values)

    @property
    def concept_accuracy(self) -> np.ndarray:
        """[n_concepts] test accuracy per concept, averaged over the classes (balanced)."""
        return np.asarray(self.accuracy).mean(axis=0)


def class_value_table(spec: D.DataSpec) -> np.ndarray:
    """Per-concept value index of every class: [n_classes, n_concepts] int32."""
    return np.array([spec.class_values(c) for c in range(spec.n_classes)], np.int32).reshape(
        spec.n_classes, len(spec.concepts))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def predict(probe: Probe, x) -> np.ndarray:
    """Per-concept value probabilities of samples.

    Args:
      probe: from ``probe_for``. x: [N, *x_shape] samples (images or vectors).
    Returns:
      [N, n_concepts, max(values)] float32. Images: softmax outputs (padding values get 0).
      Vectors: one-hot of the nearest value along each axis (with a ``band``: all zeros when
      the sample lies outside the nearest value's +- band std).
    """
    x = np.asarray(x, np.float32)
    if probe.kind != "vector":
        return net_probs(ProbeNet(probe.values, probe.widths, probe.depth), probe.net_params, x)
    n_c = len(probe.concepts)
    z = x[:, :n_c, None]  # [N, n_concepts, 1]: concept coordinates come first
    dist = np.abs(z - probe.value_pos[None])  # [N, n_concepts, nv]; padding positions are inf
    near = dist.argmin(-1)  # [N, n_concepts]
    inside = dist.min(-1) <= probe.band * probe.std[None, :] if probe.band > 0 else np.ones(near.shape, bool)
    return (np.eye(probe.n_values, dtype=np.float32)[near] * inside[..., None]).astype(np.float32)


def coordinates(probe: Probe, x) -> np.ndarray:
    """Concept-space coordinates of samples: [N, *x_shape] -> [N, n_concepts] (see module doc)."""
    x = np.asarray(x, np.float32)
    nv = np.asarray(probe.values, np.float32)
    if probe.kind != "vector":
        p = predict(probe, x)  # [N, n_concepts, nv]
        idx = np.arange(probe.n_values, dtype=np.float32)
        return (p * idx).sum(-1) / (nv - 1)[None, :]
    lo = probe.value_pos[np.arange(len(nv)), 0]  # [n_concepts]
    hi = probe.value_pos[np.arange(len(nv)), np.asarray(probe.values) - 1]
    return (x[:, :len(nv)] - lo[None, :]) / (hi - lo)[None, :]


def correct(probe: Probe, x, target) -> np.ndarray:
    """Whether each sample shows the target value of each concept.

    Args:
      x: [N, *x_shape]. target: [N, n_concepts] value indices (e.g. the prompted class's).
    Returns:
      [N, n_concepts] bool. Images: the probe's most probable value is the target. Vectors: the
      nearest value is the target (and, with a ``band``, the coordinate lies within band std).
    """
    x, target = np.asarray(x, np.float32), np.asarray(target)
    if probe.kind != "vector":
        return predict(probe, x).argmax(-1) == target
    p = predict(probe, x)  # [N, n_c, nv]; all zeros outside a band
    return (p.argmax(-1) == target) & (p.max(-1) > 0)


def cache_key(data_cfg) -> str:
    """Hash of the probe's version and every field of the data config but those its class says the
    probe ignores (``DataConfig.probe_ignores``): a field added to a data class is in the key unless
    it is named there, so a probe is never reused for data it was not trained on."""
    d = dataclasses.asdict(data_cfg)
    keep = [f.name for f in dataclasses.fields(data_cfg) if f.name not in type(data_cfg).probe_ignores]
    blob = json.dumps({"v": PROBE_VERSION, **{k: d[k] for k in keep}}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where probes are cached: ``cache`` if given, else $JAXCONCEPT_CACHE (kept only so that a
    test harness can point every process it starts at one cache), else ~/.cache/jaxconcept/probes."""
    if cache:
        return Path(cache)
    return Path(os.environ.get("JAXCONCEPT_CACHE") or Path.home() / ".cache" / "jaxconcept" / "probes")


def _save(path: Path, probe: Probe, meta: dict) -> None:
    rundir.save_tree(path / "params.npz", probe.net_params)  # before meta.json: an entry is whole once that exists
    rundir.write_json(path / "meta.json", meta)


def _load(path: Path, net: ProbeNet, x_shape: tuple):
    like = jax.eval_shape(lambda: init(net, x_shape, jax.random.PRNGKey(0)))
    return jax.tree.map(jnp.asarray, rundir.load_tree(path / "params.npz", like, "a cached probe"))


def fresh_samples(spec: D.DataSpec, params, key, n_per_class: int):
    """Fresh samples of every class from G's data distribution: (x [N, ...], labels [N])."""
    x, _, labels = D.render_all(spec, params, key, n_per_class)
    return np.asarray(x, np.float32), np.asarray(labels)


def probe_for(data_cfg, *, bar: float | None = None, band: float = 0.0, seed: int = 0, max_steps: int | None = None,
              n_test: int = 256, use_cache: bool = True, cache: str | os.PathLike | None = None,
              widths: tuple | None = None, batch_size: int = 64, lr: float = 2e-3, verbose: bool = False) -> Probe:
    """The probe for one member's data config: loaded from the cache, or built and checked.

    Args:
      data_cfg: a member's DataConfig (scalar sweep fields).
      bar: required accuracy on every concept of every class (held-out ones included); default
        0.99 (images; vectors cap it at VECTOR_BAR); celeba: per attribute, balanced over the
        combinations, default CELEBA_BAR (``_celeba_probe``).
      band: vector probes: 0 = the nearest value; k > 0 also requires |x - value| <= k std.
      seed: training / test-set seed. max_steps: image probes give up after this many steps
        (default 3000; celeba 20000).
      n_test: test samples per class (vector probes use 16x as many: they are free).
      use_cache: read and write the cache. cache: its directory (default ``cache_dir()``).
    Returns:
      Probe whose test accuracy is >= bar everywhere.
    Raises:
      ProbeError when the bar is not met: the concept-space analysis would be meaningless, or
      when ``bar`` is outside (0, 1].
    """
    if bar is not None and not 0 < bar <= 1:  # NaN fails too
        raise ProbeError(f"probe bar={bar!r} is invalid: allowed a number in (0, 1]")
    spec, params = D.spec(data_cfg), D.params(data_cfg)
    table = class_value_table(spec)
    key = jax.random.PRNGKey(seed)
    ck = cache_key(data_cfg)
    if spec.kind == "celeba":
        return _celeba_probe(data_cfg, spec, CELEBA_BAR if bar is None else bar, key, ck,
                             max_steps=max_steps or 20000, use_cache=use_cache, cache=cache_dir(cache),
                             widths=tuple(widths or _celeba_widths(spec)), batch_size=batch_size, lr=lr)
    bar = 0.99 if bar is None else bar
    max_steps = max_steps or 3000
    widths = tuple(widths or (32, 32, 32))
    if spec.kind == "vector":
        from jaxconcept.data import vector as V

        means = np.asarray(V.class_means(spec, params), np.float32)  # [n_classes, dim]
        nv = max(spec.values)
        pos = np.full((len(spec.concepts), nv), np.inf, np.float32)
        for c in range(spec.n_classes):
            for i, v in enumerate(table[c]):
                pos[i, v] = means[c, i]
        probe = Probe("vector", spec.concepts, spec.values, value_pos=pos,
                      std=np.asarray(V.class_std(spec, params), np.float32), band=float(band), key=ck)
        x, y = fresh_samples(spec, params, jax.random.fold_in(key, 7), 16 * n_test)
        acc = per_class_accuracy(correct(probe, x, table[y]), y, spec.n_classes)
        probe = dataclasses.replace(probe, accuracy=acc)
        # exact: its only errors are G's own overlapping classes, so it refuses only when even a
        # perfect generator would fall short (fewer than VECTOR_BAR of G's samples read right)
        _check(probe, spec, min(bar, VECTOR_BAR),
               f"band={band} standard deviations" if band else "the nearest-value rule (the classes overlap)")
        return probe

    net = ProbeNet(spec.values, tuple(widths))

    def from_cache(path, meta):
        return Probe("images", spec.concepts, spec.values, net_params=_load(path, net, spec.x_shape),
                     widths=tuple(widths), accuracy=np.asarray(meta["accuracy"]),
                     corner_accuracy=np.asarray(meta["corner_accuracy"]), key=ck)

    def train():
        x, y = fresh_samples(spec, params, jax.random.fold_in(key, 7), n_test)
        corner_y = np.repeat(np.arange(spec.n_classes), n_test)
        corner_x = np.asarray(D.corner_sample(spec, params, jax.random.fold_in(key, 8), jnp.asarray(corner_y))[0])

        def sample_fn(kk, labels):  # half typical draws, half at the corners of the class boxes
            k_a, k_b = jax.random.split(kk)
            half = labels.shape[0] // 2
            return jnp.concatenate([D.sample(spec, params, k_a, labels[:half])[0],
                                    D.corner_sample(spec, params, k_b, labels[half:])[0]])
        net_params, (acc, corner_acc), steps, met = fit_all(
            net, sample_fn, table, jax.random.fold_in(key, 1), [(x, y), (corner_x, corner_y)], bar=bar,
            max_steps=max_steps, batch_size=batch_size, lr=lr)
        probe = Probe("images", spec.concepts, spec.values, net_params=net_params, widths=tuple(widths),
                      accuracy=acc, corner_accuracy=corner_acc, key=ck)
        if verbose:
            logging.getLogger(__name__).info(f"probe {ck}: {steps} steps, min accuracy {acc.min():.4f}, at the corners "
                                             f"{corner_acc.min():.4f}")
        _check(probe, spec, bar, f"{steps} training steps (max_steps={max_steps})")
        return probe, {"accuracy": acc.tolist(), "corner_accuracy": corner_acc.tolist(), "bar": bar, "steps": steps,
                       "data": ck}
    return _cached(cache_dir(cache) / f"{ck}-w{'x'.join(map(str, widths))}", bar, use_cache, from_cache, train)


def _cached(path: Path, bar: float, use_cache: bool, from_cache: Callable, train: Callable) -> Probe:
    """The probe cached at ``path`` if it met at least ``bar``, else ``train()`` -> (probe, meta),
    saved there. One process trains an entry at a time (a file lock beside it): another process
    that needs the same probe waits for it and reads it, instead of training it again."""
    if not use_cache:
        return train()[0]
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (path / "meta.json").exists():
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("bar", 0) >= bar:
                try:
                    return from_cache(path, meta)
                except rundir.RunDirError:
                    pass  # a damaged entry: trained again and overwritten
        probe, meta = train()
        _save(path, probe, meta)
        return probe
    finally:
        os.close(fd)


def _check(probe: Probe, spec: D.DataSpec, bar: float, how: str) -> None:
    for acc, where in ((probe.accuracy, ""), (probe.corner_accuracy, " at the corners of its box")):
        if acc is None or acc.min() >= bar:
            continue
        c, i = np.unravel_index(int(acc.argmin()), acc.shape)
        raise ProbeError(
            f"the {probe.kind} probe reaches only {acc[c, i]:.3f} accuracy on concept '{spec.concepts[i]}' of "
            f"class {spec.class_names[c]}{where} (bar {bar}) after {how}; the concept-space analysis refuses to "
            "run with an unreliable probe (are the concepts separable in this data config?)")


def _celeba_widths(spec: D.DataSpec) -> tuple:
    """The first stages of CELEBA_WIDTHS: as many as it takes to pool the images down to 8x8
    (four at 64x64, two at 16x16)."""
    size = spec.x_shape[0]
    return CELEBA_WIDTHS[: max(1, min(len(CELEBA_WIDTHS), int(np.log2(max(size, 8) / 8)) + 1))]


def _celeba_probe(data_cfg, spec: D.DataSpec, bar: float, key, ck: str, *, max_steps: int, use_cache: bool,
                  cache: Path, widths: tuple, batch_size: int, lr: float, depth: int = 2) -> Probe:
    """The attribute probe of a CelebA-kind data config (docs/study.md A3; the reference's attribute
    classifier): a ProbeNet with one softmax head per attribute, trained with the same flips and
    colour jitter as the diffusion data on the evaluation split (``celeba.probe_data``: images of
    every combination, the held-out one included, that the diffusion model never sees), until
    each attribute's accuracy on the split's test part, averaged over the combinations, reaches
    ``bar``; else ProbeError. Cached like the image probe."""
    net = ProbeNet(spec.values, widths, depth)

    def from_cache(path, meta):
        return Probe("celeba", spec.concepts, spec.values, net_params=_load(path, net, spec.x_shape),
                     widths=widths, depth=depth, accuracy=np.asarray(meta["accuracy"]), key=ck)
    return _cached(cache / f"{ck}-w{'x'.join(map(str, widths))}-d{depth}", bar, use_cache, from_cache,
                   lambda: _train_celeba_probe(data_cfg, spec, net, bar, key, ck, max_steps, batch_size, lr))


def _train_celeba_probe(data_cfg, spec, net, bar, key, ck, max_steps, batch_size, lr):
    """Train the attribute probe (see ``_celeba_probe``): (probe, cache metadata)."""
    from jaxconcept.data import celeba

    widths, depth = net.widths, net.depth
    pd = celeba.probe_data(data_cfg)
    y = np.asarray(pd["y_train"])
    order = np.argsort(y, kind="stable")
    xs = jnp.asarray(np.asarray(pd["x_train"])[order])  # uint8 on the device, grouped by class
    counts = np.bincount(y, minlength=spec.n_classes)
    starts, counts = jnp.asarray(np.cumsum(counts) - counts, jnp.int32), jnp.asarray(counts, jnp.int32)

    def sample_fn(k, labels):  # uniform over the drawn class's images, augmented as training data
        k_i, k_v = jax.random.split(k)
        i = starts[labels] + jnp.floor(jax.random.uniform(k_i, labels.shape) * counts[labels]).astype(jnp.int32)
        return D.train_view(spec, xs[i], k_v)

    test_x = np.asarray(D.train_view(spec, jnp.asarray(np.asarray(pd["x_test"])), None))
    test_y = np.asarray(pd["y_test"])
    per_concept = lambda a: float(np.min(np.asarray(a).mean(axis=0)))  # noqa: E731
    net_params, acc, steps, met = fit(net, sample_fn, class_value_table(spec), jax.random.fold_in(key, 1), test_x,
                                      test_y, bar=bar, max_steps=max_steps, batch_size=batch_size, lr=lr,
                                      criterion=per_concept)
    probe = Probe("celeba", spec.concepts, spec.values, net_params=net_params, widths=widths, depth=depth,
                  accuracy=acc, key=ck)
    got = ", ".join(f"{c} {a:.3f}" for c, a in zip(spec.concepts, probe.concept_accuracy))
    logging.getLogger(__name__).info(f"attribute probe {ck}: {steps} steps, test accuracy {got} on {len(test_y)} "
                                     f"images (bar {bar})")
    if not met:
        i = int(np.argmin(probe.concept_accuracy))
        raise ProbeError(
            f"the attribute probe reaches only {probe.concept_accuracy[i]:.3f} accuracy on '{spec.concepts[i]}' "
            f"(bar {bar}; per combination {', '.join(f'{n} {a:.2f}' for n, a in zip(spec.class_names, acc[:, i]))}) "
            f"after {steps} training steps (max_steps={max_steps}); the concept-space analysis refuses to run with an "
            "unreliable probe (train it longer with probe_kw max_steps, or lower probe_kw bar)")
    return probe, {"accuracy": acc.tolist(), "bar": bar, "steps": steps, "data": ck,
                   "concept_accuracy": dict(zip(spec.concepts, probe.concept_accuracy.tolist()))}
