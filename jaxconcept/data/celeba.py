"""Attribute-labelled photographs (CelebA, docs/study.md A5), streamed from the host into the jitted step.

Binary attributes (e.g. Male, Smiling) are the concepts: each takes the values 0 (absent) and 1
(present), and a class is a combination of them, indexed row-major as every kind here (for two
attributes class = 2 a0 + a1, so Male x Smiling with smiling women held out holds out class 1).
The conditioning is the one-hot of each attribute, concatenated (4 entries for two attributes),
as the reference conditions; "no conditioning" is the generic all -1.

The images come from a prepared TFDS dataset, "celeb_a" by default, read by record number
(``celeba_source``: ``tfds.data_source`` over the array_record files).

Selection, with a fixed seed so that it depends on the data config alone (members that share a
data config share the arrays): the images of every combination are shuffled; each training
combination gives its first ``n_per_class`` images (balanced, as the reference balances), split
into training and validation (``val_frac``); each held-out combination gives ``n_test`` test
images for the held-out loss and nothing else — it never reaches a training batch. What is left
is the evaluation split the attribute probe learns from (``probe_data``; all combinations, the
held-out one included), tested on the source's own test partition where it has one.

Images are centre-cropped to a square (``data.crop`` source pixels, 0 = the largest centred
square), resized to ``image_size`` and stored once as uint8 ``.npy`` files in a cache directory
(``data.cache_dir``, see ``cache_dir``) keyed by everything that changes
them, written to a temporary directory and renamed into place. Runs memory-map them, so start-up
is fast and the training set never has to fit on the device: ``host_feed`` sends each step's
batches as uint8, in the order the engine's on-device draw would take them
(``batches.batch_indices``), and ``train_view`` converts and augments them on the device (random
horizontal flips and torchvision-style colour jitter in a fixed order: ``augment``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.data import DataError, DataSpec
from jaxconcept.data.augment import flip_and_jitter
from jaxconcept.data.batches import HostBatches
from jaxconcept.data.celeba_source import Index, index, read_images, source_id

CACHE_VERSION = 1  # bump when selection or preprocessing changes: old cache entries are ignored
SELECT_SEED = 0  # the selection depends on the data config only, never on a member's seed
PROBE_PER_CLASS = 5000  # at most this many probe-training images per combination
PROBE_TEST_PER_CLASS = 500  # at most this many probe-test images per combination
# data fields that do not change the cached images (how batches are conditioned and augmented, where
# files are: data_dir enters as the source's identity); every other field, one added later included,
# is in the cache key (``_key``)
CACHE_IGNORES = frozenset({"kind", "masked", "mask_prob", "augment", "jitter", "data_dir", "cache_dir"})


# --------------------------------------------------------------------------------------------
# Static description
# --------------------------------------------------------------------------------------------
def _attributes(cfg) -> tuple:
    """The attribute names of a member config, or of a sweep's first member (a list of lists)."""
    a = cfg.attributes
    return tuple(a[0]) if a and isinstance(a[0], (tuple, list)) else tuple(a)


def spec(cfg) -> DataSpec:
    """Static description of attribute data from a ``DataConfig`` with ``kind="celeba"``.

    Args:
      cfg: the data config (a member's, or a sweep's: its first attribute list names the concepts).
    Returns:
      DataSpec with x_shape (S, S, 3), cond_dim 2A, 2**A classes, ``extra`` holding the settings
      that reading and augmenting need (source, data_dir, crop, image_size, augment, jitter).
    """
    attrs = _attributes(cfg)
    values = (2,) * len(attrs)
    value_names = tuple((f"not_{a}", a) for a in attrs)
    n_classes = 2 ** len(attrs)
    names = tuple("-".join(value_names[i][v] for i, v in enumerate(np.unravel_index(c, values)))
                  for c in range(n_classes))
    held = tuple(sorted(cfg.held_out))
    n_val = max(1, int(round(cfg.val_frac * cfg.n_per_class)))
    extra = (("source", cfg.source), ("data_dir", cfg.data_dir), ("crop", int(cfg.crop)),
             ("image_size", int(cfg.image_size)), ("augment", bool(cfg.augment)), ("jitter", float(cfg.jitter)))
    return DataSpec(kind="celeba", x_shape=(cfg.image_size, cfg.image_size, 3), cond_dim=2 * len(attrs),
                    n_classes=n_classes, concepts=attrs, values=values, value_names=value_names, class_names=names,
                    train_classes=tuple(c for c in range(n_classes) if c not in held), held_out=held,
                    n_train=cfg.n_per_class - n_val, n_val=n_val, n_test=cfg.n_test, extra=extra)


def _onehot_table(n_attrs: int) -> np.ndarray:
    """One-hot conditioning of every class: [2**A, 2A] float32 (attribute i's pair at 2i, 2i + 1)."""
    vals = np.array(list(np.ndindex(*(2,) * n_attrs)), np.int64).reshape(-1, n_attrs)  # row-major classes
    return np.eye(2, dtype=np.float32)[vals].reshape(len(vals), 2 * n_attrs)


def params(cfg) -> dict:
    """Per-member arrays (the same shapes for every member): {"prompts": [n_classes, 2A]}."""
    return {"prompts": jnp.asarray(_onehot_table(len(_attributes(cfg))))}


def prompts(spec: DataSpec, params):
    """The one-hot prompt of every class: [n_classes, cond_dim]."""
    return params["prompts"]


def host_dtype(spec: DataSpec):
    return np.uint8


def train_view(spec: DataSpec, x, key):
    """uint8 images [..., S, S, 3] -> float32 in [0, 1]; with a key (a training batch) and
    ``data.augment``, each image is flipped left-right with probability 1/2 and colour-jittered
    with strength ``data.jitter`` (``augment.flip_and_jitter``). ``key=None`` converts only
    (evaluation)."""
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    if key is None or not spec.opt("augment"):
        return x
    shape = x.shape
    flat = x.reshape(-1, *shape[-3:])  # [N, S, S, 3]
    keys = jax.random.split(key, flat.shape[0])
    strength = float(spec.opt("jitter"))
    return jax.vmap(lambda img, k: flip_and_jitter(img, k, strength))(flat, keys).reshape(shape)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
def class_labels(attrs: np.ndarray) -> np.ndarray:
    """[..., A] attribute values -> [...] class index, row-major (the first attribute most significant)."""
    attrs = np.asarray(attrs, np.int64)
    return (attrs * 2 ** np.arange(attrs.shape[-1])[::-1]).sum(axis=-1)


def _shuffled_classes(idx: Index, cfg, sp: DataSpec) -> list[np.ndarray]:
    """Per class, its image positions in a fixed random order (the selection's seed)."""
    labels = class_labels(idx.attrs[:, idx.columns(sp.concepts)])
    rng = np.random.default_rng(SELECT_SEED)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(sp.n_classes)]


def _counts(idx: Index, sp: DataSpec, per_class) -> str:
    return ", ".join(f"{sp.class_names[c]} {len(p)}" for c, p in enumerate(per_class))


def select(idx: Index, cfg) -> dict:
    """Positions (into the index) and class labels of the training, validation and test images.

    Returns:
      {"train", "val", "test"} -> (positions [n] int64, labels [n] int32); training and validation
      images come from the training classes only, test images from the held-out classes only.
    Raises:
      DataError when a combination has too few images for ``n_per_class`` or ``n_test``.
    """
    sp = spec(cfg)
    per_class = _shuffled_classes(idx, cfg, sp)
    out = {k: ([], []) for k in ("train", "val", "test")}
    for c, pos in enumerate(per_class):
        need = cfg.n_per_class if c in sp.train_classes else sp.n_test
        if len(pos) < need:
            what = "data.n_per_class" if c in sp.train_classes else "data.n_test"
            raise DataError(f"{what}={need}: the combination {sp.class_names[c]} has only {len(pos)} images in "
                            f"{idx.describe()} (per combination: {_counts(idx, sp, per_class)}); lower {what}")
        if c in sp.train_classes:
            parts = (("train", pos[: sp.n_train]), ("val", pos[sp.n_train: cfg.n_per_class]))
        else:
            parts = (("test", pos[: sp.n_test]),)
        for name, p in parts:
            out[name][0].append(p)
            out[name][1].append(np.full(len(p), c, np.int32))
    return {k: (np.concatenate(p).astype(np.int64), np.concatenate(y)) for k, (p, y) in out.items()}


def select_probe(idx: Index, cfg, per_class: int = PROBE_PER_CLASS, test_per_class: int = PROBE_TEST_PER_CLASS) -> dict:
    """The evaluation split: images of every combination (held-out included) that ``select`` does
    not use, for the attribute probe. Its test part comes from the source's test partition when it
    has one (else the first fifth of what is left), its training part from the rest.

    Returns {"train", "test"} -> (positions, labels)."""
    sp = spec(cfg)
    per = _shuffled_classes(idx, cfg, sp)
    used = set(np.concatenate([p for p, _ in select(idx, cfg).values()]).tolist())
    has_test = bool((idx.partition == 2).any())
    out = {"train": ([], []), "test": ([], [])}
    for c, pos in enumerate(per):
        rest = np.asarray([p for p in pos if p not in used], np.int64)
        if has_test:
            te = rest[idx.partition[rest] == 2][:test_per_class]
            tr = rest[idx.partition[rest] != 2][:per_class]
        else:
            n_te = min(test_per_class, max(1, len(rest) // 5))
            te, tr = rest[:n_te], rest[n_te: n_te + per_class]
        if len(te) < 1 or len(tr) < 1:
            raise DataError(f"the attribute probe needs images of every combination that the diffusion data do not "
                            f"use, for training and for testing, and {sp.class_names[c]} has {len(tr)} and {len(te)} "
                            f"left in {idx.describe()}; lower data.n_per_class or data.n_test")
        for name, p in (("train", tr), ("test", te)):
            out[name][0].append(p)
            out[name][1].append(np.full(len(p), c, np.int32))
    return {k: (np.concatenate(p), np.concatenate(y)) for k, (p, y) in out.items()}


# --------------------------------------------------------------------------------------------
# The cache of preprocessed images
# --------------------------------------------------------------------------------------------
def cache_dir(cfg=None) -> Path:
    """Where preprocessed images are kept: ``cfg.cache_dir`` if set, else $JAXCONCEPT_DATA_CACHE (kept
    only so that a test harness can point every process it starts at one cache), else
    ~/.cache/jaxconcept/data."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("JAXCONCEPT_DATA_CACHE") or Path.home() / ".cache" / "jaxconcept" / "data")


def _key(cfg, what: str, **extra) -> str:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in CACHE_IGNORES}
    blob = json.dumps({"v": CACHE_VERSION, "what": what, **fields, "source": source_id(cfg),
                       "attributes": _attributes(cfg), "held_out": sorted(cfg.held_out), **extra},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _build(path: Path, idx: Index, parts: dict, crop: int, size: int) -> None:
    """Read, crop and resize the images of ``parts`` ({name: (positions, labels)}) into
    x_NAME.npy (uint8 [n, S, S, 3]) and y_NAME.npy, in a temporary directory renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        logging.getLogger(__name__).info(f"preparing {sum(len(p) for p, _ in parts.values())} images of "
                                         f"{idx.describe()} at {size}x{size} (once; cached in {path.parent})")
        for name, (pos, y) in parts.items():
            x = np.lib.format.open_memmap(tmp / f"x_{name}.npy", "w+", np.uint8, (len(pos), size, size, 3))
            read_images(idx, pos, crop, size, x)
            x.flush()
            np.save(tmp / f"y_{name}.npy", y.astype(np.int32))
        (tmp / "meta.json").write_text(json.dumps({"source": idx.describe(), "parts": {
            k: len(p) for k, (p, _) in parts.items()}, "image_size": size, "crop": crop}) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes the entry visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first: keep theirs
            if not (path / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_LOCK = threading.Lock()
_LOADED: dict = {}


def _cached(cfg, what: str, names, make_parts, **extra) -> dict:
    key = _key(cfg, what, **extra)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        path = cache_dir(cfg) / f"{what}-{key}"
        if not (path / "meta.json").exists():
            idx = index(cfg)
            _build(path, idx, make_parts(idx), int(cfg.crop), int(cfg.image_size))
        try:
            _LOADED[key] = {f"{xy}_{n}": np.load(path / f"{xy}_{n}.npy", mmap_mode="r" if xy == "x" else None)
                            for n in names for xy in "xy"}
        except (OSError, ValueError) as exc:
            raise DataError(f"the data cache {path} is damaged ({exc}); delete it to have it rebuilt") from None
        return _LOADED[key]


def load(cfg) -> dict:
    """The diffusion data of a member's data config (memory-mapped uint8 images):
    x_train, y_train, x_val, y_val (training classes), x_test, y_test (held-out classes).
    Raises DataError (see ``select`` and ``celeba_source.index``)."""
    return _cached(cfg, "data", ("train", "val", "test"), lambda idx: select(idx, cfg))


def probe_data(cfg, per_class: int = PROBE_PER_CLASS, test_per_class: int = PROBE_TEST_PER_CLASS) -> dict:
    """The evaluation split for the attribute probe (``select_probe``): x_train, y_train, x_test,
    y_test, every combination included."""
    return _cached(cfg, "probe", ("train", "test"), lambda idx: select_probe(idx, cfg, per_class, test_per_class),
                   probe=[per_class, test_per_class])


# --------------------------------------------------------------------------------------------
# Host feed: every member's training batches, in the order of the engine's on-device draw
# --------------------------------------------------------------------------------------------
class _Feed:
    """``feed(step, k)``: the batches of steps step .. step+k-1 of every member (numpy), the rows
    ``batches.batch_indices`` picks with the member's train key, as the engine's ``draw_batch``
    would pick them from an on-device training set. The next call's batches are prepared on a
    background thread while the device trains."""

    def __init__(self, spec: DataSpec, members, keys):
        self.spec, self.members = spec, list(members)
        self.data = [load(m.data) for m in self.members]  # shared by members with the same data config
        self.tables = [_onehot_table(len(_attributes(m.data))) for m in self.members]
        self.order = [HostBatches(k, len(d["y_train"]), m.train.batch_size, m.train.batches)
                      for k, d, m in zip(np.asarray(keys), self.data, self.members)]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._ahead: tuple | None = None

    def _make(self, step: int, k: int) -> dict:
        s, b = self.spec, self.members[0].train.batch_size
        x = np.empty((len(self.members), k, b, *s.x_shape), np.uint8)
        c = np.empty((len(self.members), k, b, s.cond_dim), np.float32)
        nv = np.empty((len(self.members), k), np.int32)
        for i, d in enumerate(self.data):
            for j in range(k):
                rows, nv[i, j] = self.order[i].rows(step + j)
                order = np.argsort(rows)  # read the memory map in ascending order
                x[i, j, order] = d["x_train"][rows[order]]
                c[i, j] = self.tables[i][d["y_train"][rows]]
        return {"x": x, "c": c, "n": nv}

    def __call__(self, step: int, k: int) -> dict:
        ahead, self._ahead = self._ahead, None
        out = ahead[1].result() if ahead is not None and ahead[0] == (step, k) else self._make(step, k)
        self._ahead = ((step + k, k), self._pool.submit(self._make, step + k, k))
        return out


def host_feed(spec: DataSpec, members, keys):
    """``feed(step, k) -> {x [M, k, B, S, S, 3] uint8, c [M, k, B, cond_dim] float32, n [M, k] int32}``
    for the (padded) member configs ``members`` with train keys ``keys`` [M, 2] (see ``_Feed``)."""
    return _Feed(spec, members, keys)


def host_eval_data(spec: DataSpec, members) -> dict:
    """The held-back sets of every member, numpy [M, N, ...]: x_val, c_val (training classes'
    validation images), x_test, c_test (the held-out classes' test images); x in uint8."""
    out = {k: [] for k in ("x_val", "c_val", "x_test", "c_test")}
    for m in members:
        d, table = load(m.data), _onehot_table(len(_attributes(m.data)))
        for part in ("val", "test"):
            out[f"x_{part}"].append(np.asarray(d[f"x_{part}"]))
            out[f"c_{part}"].append(table[d[f"y_{part}"]])
    return {k: np.stack(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Concept signal
# --------------------------------------------------------------------------------------------
def concept_signal(cfg, key=None, n: int = 256) -> dict:
    """{attribute: signal}: how much the images change with each attribute, from the data.

    For attribute i and each setting of the other attributes under which both of its values are
    training combinations, the root-mean-square difference per pixel and channel (in [0, 1]
    units) between the mean training image with attribute i present and the one with it absent
    (at most ``n`` images per combination); averaged over those settings. An attribute with no
    such setting (every pair crosses a held-out combination) falls back to the held-out test
    images. Deterministic (``key`` is unused: the images are the data's own)."""
    sp = spec(cfg)
    d = load(cfg)
    means = {}
    for c in range(sp.n_classes):
        for part in ("train", "test"):
            rows = np.flatnonzero(d[f"y_{part}"] == c)[:n]
            if len(rows):
                means[c] = np.asarray(d[f"x_{part}"][np.sort(rows)], np.float64).mean(axis=0) / 255.0
                break
    out = {}
    for i, name in enumerate(sp.concepts):
        diffs, fallback = [], []
        for c in range(sp.n_classes):
            vals = list(sp.class_values(c))
            if vals[i] != 0:
                continue
            vals[i] = 1
            c1 = int(np.ravel_multi_index(vals, sp.values))
            if c in means and c1 in means:
                rms = float(np.sqrt(np.mean((means[c1] - means[c]) ** 2)))
                (diffs if c in sp.train_classes and c1 in sp.train_classes else fallback).append(rms)
        vals = diffs or fallback
        out[name] = float(np.mean(vals)) if vals else 0.0
    return out
