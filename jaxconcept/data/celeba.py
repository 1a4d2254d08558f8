"""Attribute-labelled photographs (CelebA, SPEC A5), streamed from the host into the jitted step.

Binary attributes (e.g. Male, Smiling) are the concepts: each takes the values 0 (absent) and 1
(present), and a class is a combination of them, indexed row-major as every kind here (for two
attributes class = 2 a0 + a1, so Male x Smiling with smiling women held out holds out class 1).
The conditioning is the one-hot of each attribute, concatenated (4 entries for two attributes),
as the reference conditions; "no conditioning" is the generic all -1.

Sources (``data.source``):
  * a TFDS dataset name, "celeb_a" by default: read through tensorflow-datasets (the optional
    extra ``jaxconcept[celeba]``, imported only here and only when needed) from ``data.data_dir``
    ("" = TFDS's default directory), prepared by TFDS's own download step. Any TFDS dataset with
    an image feature and boolean attributes (top-level, or in an "attributes" dict) works.
  * "folder": ``data.data_dir`` holds the images and a CelebA-style attribute table
    ``list_attr_celeba.txt`` (a count line, a line of attribute names, then "FILE v1 v2 ..." with
    1 / -1), optionally ``list_eval_partition.txt`` ("FILE p", p = 0 train, 1 val, 2 test).
    Images are looked up beside the table or in its ``img_align_celeba/`` folder.

Selection, with a fixed seed so that it depends on the data config alone (members that share a
data config share the arrays): the images of every combination are shuffled; each training
combination gives its first ``n_per_class`` images (balanced, as the reference balances), split
into training and validation (``val_frac``); each held-out combination gives ``n_test`` test
images for the held-out loss and nothing else — it never reaches a training batch. What is left
is the evaluation split the attribute probe learns from (``probe_data``; all combinations, the
held-out one included), tested on the source's own test partition where it has one.

Images are centre-cropped to a square (``data.crop`` source pixels, 0 = the largest centred
square), resized to ``image_size`` and stored once as uint8 ``.npy`` files in a cache directory
(``$JAXCONCEPT_DATA_CACHE``, default ``~/.cache/jaxconcept/data``) keyed by everything that changes
them, written to a temporary directory and renamed into place. Runs memory-map them, so start-up
is fast and the training set never has to fit on the device: ``host_feed`` sends each step's
batches as uint8, and ``train_view`` converts and augments them on the device (random horizontal
flips and torchvision-style colour jitter, as the reference's transforms).
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.data import DataSpec
from jaxconcept.rundir import RunDirError

CACHE_VERSION = 1  # bump when selection or preprocessing changes: old cache entries are ignored
SELECT_SEED = 0  # the selection depends on the data config only, never on a member's seed
PROBE_PER_CLASS = 5000  # at most this many probe-training images per combination
PROBE_TEST_PER_CLASS = 500  # at most this many probe-test images per combination
ATTR_FILE, PARTITION_FILE = "list_attr_celeba.txt", "list_eval_partition.txt"
FEED_STREAM = 0x6A78  # numpy seed-sequence tag of the batch stream (keeps it apart from other uses)


class DataError(RunDirError):
    """The dataset is missing, unreadable or too small for the config: one message says what to do."""


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


# --------------------------------------------------------------------------------------------
# Augmentation on the device (torchvision's ColorJitter and RandomHorizontalFlip, in JAX)
# --------------------------------------------------------------------------------------------
_LUMA = (0.2989, 0.587, 0.114)  # the grey level torchvision's adjustments blend towards


def _grey(x):  # [H, W, 3] -> [H, W]
    return x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]


def _blend(a, b, ratio):
    return jnp.clip(ratio * a + (1.0 - ratio) * b, 0.0, 1.0)


def _rgb_to_hsv(x):
    """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn, as Python's colorsys)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.max(x, axis=-1)
    delta = v - jnp.min(x, axis=-1)
    s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
    d = jnp.where(delta > 0, delta, 1.0)
    h = jnp.where(v == r, (g - b) / d, jnp.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return jnp.stack([h, s, v], axis=-1)


def _hsv_to_rgb(x):
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = jnp.mod(i, 6).astype(jnp.int32)[..., None]
    # the six sectors of the hue circle: (r, g, b) for i = 0 .. 5
    cands = jnp.stack([jnp.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return jnp.take_along_axis(jnp.moveaxis(cands, 0, -2), i[..., None], axis=-2)[..., 0, :]


def _shift_hue(x, turns):
    hsv = _rgb_to_hsv(x)
    return _hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + turns, 1.0)))


def colour_jitter(x, key, strength: float):
    """One image [H, W, 3] in [0, 1] jittered as torchvision's ColorJitter(s, s, s, s): brightness,
    contrast and saturation factors drawn from U(1 - s, 1 + s), a hue shift from U(-s, s) turns,
    applied in a random order, each clipped to [0, 1]."""
    k_order, k_f = jax.random.split(key)
    lo = jnp.array([1 - strength, 1 - strength, 1 - strength, -strength])
    f = jax.random.uniform(k_f, (4,), minval=lo, maxval=lo + 2 * strength)
    ops = (
        lambda y: _blend(y, 0.0, f[0]),  # brightness: towards black
        lambda y: _blend(y, jnp.mean(_grey(y)), f[1]),  # contrast: towards the mean grey level
        lambda y: _blend(y, _grey(y)[..., None], f[2]),  # saturation: towards the grey image
        lambda y: _shift_hue(y, f[3]),
    )
    order = jax.random.permutation(k_order, 4)
    for pos in range(4):
        x = jax.lax.switch(order[pos], ops, x)
    return x


def train_view(spec: DataSpec, x, key):
    """uint8 images [..., S, S, 3] -> float32 in [0, 1]; with a key (a training batch) and
    ``data.augment``, each image is flipped left-right with probability 1/2 and colour-jittered
    with strength ``data.jitter``. ``key=None`` converts only (evaluation)."""
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    if key is None or not spec.opt("augment"):
        return x
    shape = x.shape
    flat = x.reshape(-1, *shape[-3:])  # [N, S, S, 3]
    keys = jax.random.split(key, flat.shape[0])
    strength = float(spec.opt("jitter"))

    def one(img, k):
        k_flip, k_jit = jax.random.split(k)
        img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
        return colour_jitter(img, k_jit, strength) if strength > 0 else img

    return jax.vmap(one)(flat, keys).reshape(shape)


# --------------------------------------------------------------------------------------------
# Sources: an index of every image (keys, attribute table, partition)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Index:
    """Every image of a source: attribute names, attrs [N, n_attr] in {0, 1}, partition [N]
    (0 train, 1 validation, 2 test; -1 unknown), keys [N] (file names, or record numbers)."""

    source: str
    root: str
    names: tuple
    attrs: np.ndarray
    partition: np.ndarray
    keys: np.ndarray
    reader: object  # (positions [n], on_image(position_in_request, PIL image)) -> None

    def columns(self, attributes) -> list[int]:
        missing = [a for a in attributes if a not in self.names]
        if missing:
            raise DataError(f"data.attributes: {', '.join(map(repr, missing))} not among the attributes of "
                            f"{self.describe()}: allowed {', '.join(self.names)}")
        return [self.names.index(a) for a in attributes]

    def describe(self) -> str:
        if self.source == "folder":
            return f"the folder {self.root}"
        return f"the TFDS dataset {self.source!r} in {self.root}"


def _folder_root(cfg) -> Path:
    if not cfg.data_dir:
        raise DataError("data.source='folder' needs data.data_dir: the folder holding the images and "
                        f"{ATTR_FILE}")
    return Path(cfg.data_dir).expanduser().resolve()


def _read_table(path: Path, what: str) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _folder_index(cfg) -> Index:
    root = _folder_root(cfg)
    table = root / ATTR_FILE
    if not table.is_file():
        raise DataError(f"data.data_dir={cfg.data_dir!r}: no {ATTR_FILE} in {root}; a folder dataset is the "
                        f"images plus {ATTR_FILE} (a count line, a line of attribute names, then 'FILE v1 v2 ...' "
                        "with 1/-1), as CelebA ships it")
    rows = _read_table(table, "the attribute table")
    if len(rows) < 2 or not rows[1]:
        raise DataError(f"{table}: expected a count line and a line of attribute names")
    names = tuple(rows[1])
    body = [r for r in rows[2:] if r]
    keys, attrs = [], np.zeros((len(body), len(names)), np.int8)
    for i, r in enumerate(body):
        if len(r) != len(names) + 1 or any(v not in ("1", "-1", "0") for v in r[1:]):
            raise DataError(f"{table}, line {i + 3}: expected a file name and {len(names)} values of 1 or -1")
        keys.append(r[0])
        attrs[i] = [v == "1" for v in r[1:]]
    partition = np.full(len(keys), -1, np.int8)
    ptable = root / PARTITION_FILE
    if ptable.is_file():
        where = {k: i for i, k in enumerate(keys)}
        for r in _read_table(ptable, "the partition table"):
            if len(r) == 2 and r[0] in where and r[1] in ("0", "1", "2"):
                partition[where[r[0]]] = int(r[1])
    keys = np.asarray(keys)

    def reader(positions, on_image):
        from PIL import Image

        def load(j):
            path = _image_path(root, str(keys[positions[j]]))
            try:
                with Image.open(path) as im:
                    on_image(j, im.convert("RGB"))
            except OSError as exc:
                raise DataError(f"cannot read the image {path}: {exc}") from None
        _parallel(load, len(positions))

    return Index("folder", str(root), names, attrs, partition, keys, reader)


def _image_path(root: Path, name: str) -> Path:
    for p in (root / name, root / "img_align_celeba" / name):
        if p.is_file():
            return p
    raise DataError(f"the image {name!r} listed in {root / ATTR_FILE} is in neither {root} nor "
                    f"{root / 'img_align_celeba'}")


def _parallel(fn, n: int) -> None:
    """fn(0) .. fn(n - 1) on a few threads (PIL decodes and resizes without the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for f in concurrent.futures.as_completed([pool.submit(fn, j) for j in range(n)]):
            f.result()


def _import_tfds():
    """tensorflow-datasets, imported on first use (the core library never needs it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError(f"data.source reads a TFDS dataset through tensorflow-datasets, which cannot be imported "
                        f"({exc}): pip install 'jaxconcept[celeba]', or use data.source='folder' with the "
                        f"images and {ATTR_FILE}") from None
    try:  # TF must leave the accelerators to JAX
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    return tf, tfds


def _tfds_root(cfg) -> str:
    """The TFDS data directory as TFDS resolves it: data.data_dir, else $TFDS_DATA_DIR, else
    ~/tensorflow_datasets."""
    return str(Path(cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser().resolve())


def prepare_command(cfg) -> str:
    """The shell command that prepares a TFDS source in data.data_dir."""
    return f"tfds build {cfg.source} --data_dir {_tfds_root(cfg)}"


def _missing_message(cfg, root: str) -> str:
    msg = (f"the TFDS dataset {cfg.source!r} is not prepared in {root} (data.data_dir={cfg.data_dir!r}); prepare "
           f"it once with: pip install 'jaxconcept[celeba]' && {prepare_command(cfg)}")
    if cfg.source.split(":")[0].split("/")[0] == "celeb_a":
        msg += (f" (about 1.4 GB; if Google Drive refuses the download, put img_align_celeba.zip, {ATTR_FILE}, "
                f"{PARTITION_FILE}, list_landmarks_align_celeba.txt and identity_CelebA.txt from the CelebA site in "
                f"{Path(root) / 'downloads' / 'manual'} and run the same command)")
    return msg + f"; or set data.source='folder' and data.data_dir to a folder of images with {ATTR_FILE}"


def _tfds_builder(cfg):
    tf, tfds = _import_tfds()
    root = _tfds_root(cfg)
    try:
        builder = tfds.builder(cfg.source, data_dir=root)
    except Exception as exc:  # noqa: BLE001 - TFDS raises several kinds for an unknown or unreadable name
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.source={cfg.source!r}: no TFDS dataset of that name is registered or prepared in {root} "
                        f"[{line}]; allowed 'celeb_a' (the default), another TFDS dataset with an image feature and "
                        f"boolean attributes, or 'folder' with data.data_dir holding the images and "
                        f"{ATTR_FILE}") from None
    if not builder.is_prepared():
        raise DataError(_missing_message(cfg, root))
    return tf, tfds, builder, root


def _tfds_features(tfds, builder, source: str):
    """(image key, attribute path, attribute names) of a TFDS dataset: its image feature and its
    boolean attributes, in an "attributes" dict or at the top level."""
    feats = builder.info.features
    images = [k for k, f in feats.items() if isinstance(f, tfds.features.Image)]
    if not images:
        raise DataError(f"the TFDS dataset {source!r} has no image feature (features: {', '.join(feats)})")
    image = "image" if "image" in images else images[0]

    def flags(d):
        return [k for k, f in d.items() if isinstance(f, tfds.features.Tensor) and f.shape == ()
                and np.dtype(f.np_dtype) == np.bool_]
    if "attributes" in feats and isinstance(feats["attributes"], tfds.features.FeaturesDict):
        path, names = "attributes", flags(feats["attributes"])
    else:
        path, names = None, flags(feats)
    if not names:
        raise DataError(f"the TFDS dataset {source!r} has no boolean attributes (features: {', '.join(feats)})")
    return image, path, tuple(names)


_SPLIT_PARTITION = {"train": 0, "validation": 1, "valid": 1, "val": 1, "test": 2}


def _tfds_index(cfg) -> Index:
    tf, tfds, builder, root = _tfds_builder(cfg)
    image, path, names = _tfds_features(tfds, builder, cfg.source)
    splits = sorted(builder.info.splits, key=lambda s: (_SPLIT_PARTITION.get(s, 3), s))

    def records(split, with_image: bool):
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders={image: tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))

        def pick(ex):
            src = ex[path] if path else ex
            out = {"a": tf.stack([tf.cast(src[n], tf.int8) for n in names])}
            if with_image:
                out["image"] = ex[image]
            return out
        return tfds.as_numpy(ds.map(pick).batch(256))

    attrs, partition = [], []
    for split in splits:
        for batch in records(split, False):
            attrs.append(batch["a"])
            partition.append(np.full(len(batch["a"]), _SPLIT_PARTITION.get(split, 0), np.int8))
    attrs = np.concatenate(attrs) if attrs else np.zeros((0, len(names)), np.int8)
    partition = np.concatenate(partition) if partition else np.zeros((0,), np.int8)

    def reader(positions, on_image):
        from PIL import Image

        want = {int(p): j for j, p in enumerate(positions)}
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        futures, at = [], 0

        def decode(j, blob):
            with Image.open(io.BytesIO(blob)) as im:
                on_image(j, im.convert("RGB"))
        try:
            for split in splits:  # one pass in the index's order; only wanted images are decoded
                for batch in records(split, True):
                    for r, blob in enumerate(batch["image"]):
                        j = want.get(at + r)
                        if j is not None:
                            futures.append(pool.submit(decode, j, blob))
                    at += len(batch["image"])
            for f in futures:
                f.result()
        finally:
            pool.shutdown()

    return Index(cfg.source, root, names, attrs.astype(np.int8), partition, np.arange(len(attrs)), reader)


def _source_id(cfg) -> str:
    """What identifies the source's content, from cheap file-system facts (no TFDS import)."""
    if cfg.source == "folder":
        root = _folder_root(cfg)
        facts = [str(root)]
        for name in (ATTR_FILE, PARTITION_FILE):
            p = root / name
            facts.append(f"{name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else f"{name}:-")
        return "|".join(facts)
    root = Path(_tfds_root(cfg))
    base = root / cfg.source.split(":")[0].split("/")[0]
    infos = sorted(str(p.relative_to(root)) + f":{p.stat().st_mtime_ns}" for p in base.rglob("dataset_info.json")) \
        if base.is_dir() else []
    return "|".join([cfg.source, str(root), *infos])


@functools.lru_cache(maxsize=4)
def _index(cfg_key: tuple) -> Index:
    cfg = _Cfg(*cfg_key)
    return _folder_index(cfg) if cfg.source == "folder" else _tfds_index(cfg)


@dataclass(frozen=True)
class _Cfg:
    source: str
    data_dir: str


def index(cfg) -> Index:
    """The source's index (read once per process)."""
    return _index((cfg.source, cfg.data_dir))


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
# Preprocessing and the cache
# --------------------------------------------------------------------------------------------
def preprocess(img, crop: int, size: int) -> np.ndarray:
    """A PIL RGB image -> uint8 [size, size, 3]: the centred square of side ``crop`` (0 = the
    largest; never more than the image), resized bilinearly (with antialiasing when shrinking)."""
    from PIL import Image

    w, h = img.size
    side = min(w, h) if crop <= 0 else min(crop, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.uint8)


def cache_dir() -> Path:
    return Path(os.environ.get("JAXCONCEPT_DATA_CACHE", Path.home() / ".cache" / "jaxconcept" / "data"))


def _key(cfg, what: str, **extra) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "what": what, "source": _source_id(cfg), "attributes": _attributes(cfg),
                       "held_out": sorted(cfg.held_out), "n_per_class": cfg.n_per_class, "val_frac": cfg.val_frac,
                       "n_test": cfg.n_test, "image_size": cfg.image_size, "crop": cfg.crop, **extra},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _build(path: Path, idx: Index, parts: dict, crop: int, size: int) -> None:
    """Decode, crop and resize the images of ``parts`` ({name: (positions, labels)}) into
    x_NAME.npy (uint8 [n, S, S, 3]) and y_NAME.npy, in a temporary directory renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        order = np.concatenate([p for p, _ in parts.values()])
        xs, where = {}, []
        for name, (pos, y) in parts.items():
            xs[name] = np.lib.format.open_memmap(tmp / f"x_{name}.npy", "w+", np.uint8, (len(pos), size, size, 3))
            np.save(tmp / f"y_{name}.npy", y.astype(np.int32))
            where += [(name, i) for i in range(len(pos))]

        def on_image(j, img):
            name, i = where[j]
            xs[name][i] = preprocess(img, crop, size)
        print(f"jaxconcept: preparing {len(order)} images of {idx.describe()} at {size}x{size} (once; cached in "
              f"{path.parent})", flush=True)
        idx.reader(order, on_image)
        for x in xs.values():
            x.flush()
        (tmp / "meta.json").write_text(json.dumps({"source": idx.describe(), "parts": {
            k: len(p) for k, (p, _) in parts.items()}, "image_size": size, "crop": crop}) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first: keep theirs
            if not (path / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open(path: Path, names) -> dict:
    out = {}
    for n in names:
        out[f"x_{n}"] = np.load(path / f"x_{n}.npy", mmap_mode="r")
        out[f"y_{n}"] = np.load(path / f"y_{n}.npy")
    return out


_LOCK = threading.Lock()
_LOADED: dict = {}


def _cached(cfg, what: str, names, make_parts, **extra) -> dict:
    key = _key(cfg, what, **extra)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        path = cache_dir() / f"{what}-{key}"
        if not (path / "meta.json").exists():
            idx = index(cfg)
            _build(path, idx, make_parts(idx), int(cfg.crop), int(cfg.image_size))
        try:
            _LOADED[key] = _open(path, names)
        except (OSError, ValueError) as exc:
            raise DataError(f"the data cache {path} is damaged ({exc}); delete it to have it rebuilt") from None
        return _LOADED[key]


def load(cfg) -> dict:
    """The diffusion data of a member's data config (memory-mapped uint8 images):
    x_train, y_train, x_val, y_val (training classes), x_test, y_test (held-out classes)."""
    return _cached(cfg, "data", ("train", "val", "test"), lambda idx: select(idx, cfg))


def probe_data(cfg, per_class: int = PROBE_PER_CLASS, test_per_class: int = PROBE_TEST_PER_CLASS) -> dict:
    """The evaluation split for the attribute probe (``select_probe``): x_train, y_train, x_test,
    y_test, every combination included."""
    return _cached(cfg, "probe", ("train", "test"), lambda idx: select_probe(idx, cfg, per_class, test_per_class),
                   probe=[per_class, test_per_class])


# --------------------------------------------------------------------------------------------
# Host feed: every member's training batches, a pure function of (member seed, step)
# --------------------------------------------------------------------------------------------
class _Feed:
    """``feed(step, k)``: the batches of steps step .. step+k-1 of every member (numpy), as the
    engine's on-device ``draw_batch`` would draw them: with ``train.batches="epochs"`` each
    member's training set is reshuffled every epoch (a permutation seeded by its seed and the
    epoch) and read without replacement, the epoch's short last batch padded and its real size in
    ``n``; with "replacement", B uniform draws seeded by (seed, step). The next call's batches are
    prepared on a background thread while the device trains."""

    def __init__(self, spec: DataSpec, members):
        self.spec = spec
        self.members = list(members)
        self.data = [load(m.data) for m in self.members]  # shared by members with the same data config
        self.tables = [_onehot_table(len(_attributes(m.data))) for m in self.members]
        self._perm: dict = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._ahead: tuple | None = None

    def _perm_of(self, i: int, seed: int, epoch: int, n: int) -> np.ndarray:
        key = (seed, epoch, n)
        p = self._perm.get(i)
        if p is None or p[0] != key:
            rng = np.random.default_rng([FEED_STREAM, seed, epoch])
            p = (key, rng.permutation(n))
            self._perm[i] = p
        return p[1]

    def indices(self, i: int, step: int):
        """Rows of member i's training set in the batch of ``step``, and how many are real."""
        m, n = self.members[i], len(self.data[i]["y_train"])
        b, seed = m.train.batch_size, int(m.seeds[0])
        if m.train.batches == "replacement":
            return np.random.default_rng([FEED_STREAM, seed, 1, step]).integers(0, n, b), b
        per_epoch = -(-n // b)
        epoch, start = divmod(step, per_epoch)
        start *= b
        perm = self._perm_of(i, seed, epoch, n)
        return perm[(start + np.arange(b)) % n], min(b, n - start)

    def _make(self, step: int, k: int) -> dict:
        s, b = self.spec, self.members[0].train.batch_size
        x = np.empty((len(self.members), k, b, *s.x_shape), np.uint8)
        c = np.empty((len(self.members), k, b, s.cond_dim), np.float32)
        nv = np.empty((len(self.members), k), np.int32)
        for i, d in enumerate(self.data):
            for j in range(k):
                rows, nv[i, j] = self.indices(i, step + j)
                order = np.argsort(rows)  # read the memory map in ascending order
                x[i, j, order] = d["x_train"][rows[order]]
                c[i, j] = self.tables[i][d["y_train"][rows]]
        return {"x": x, "c": c, "n": nv}

    def __call__(self, step: int, k: int) -> dict:
        ahead, self._ahead = self._ahead, None
        out = ahead[1].result() if ahead is not None and ahead[0] == (step, k) else self._make(step, k)
        self._ahead = ((step + k, k), self._pool.submit(self._make, step + k, k))
        return out


def host_feed(spec: DataSpec, members):
    """``feed(step, k) -> {x [M, k, B, S, S, 3] uint8, c [M, k, B, cond_dim] float32, n [M, k] int32}``
    for the (padded) member configs ``members`` (see ``_Feed``)."""
    return _Feed(spec, members)


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
