"""Where CelebA-kind images come from: a prepared TFDS dataset, read with random access.

``data.source`` names a TFDS dataset ("celeb_a" by default) prepared in ``data.data_dir`` ("" =
$TFDS_DATA_DIR, else ~/tensorflow_datasets) in the ``array_record`` file format, which TFDS's
data source (``tfds.data_source``; here the builder's ``as_data_source``, every split as one
sequence) reads by record number: ``tfds build celeb_a --data_dir DIR --file_format array_record``.
Any TFDS dataset with an image feature and boolean attributes (top-level, or in an "attributes"
dict) works. tensorflow-datasets (with TensorFlow, which it needs to import, and whose
``tf.io.parse_example`` reads the records' fields in bulk) is the optional extra
``jaxconcept[celeba]``, imported only here and only when needed.

The index (every record's attributes and split) is read once per process; the images ``select``
picks are then read by record number, decoded with PIL, centre-cropped and resized
(``preprocess``), a few reading threads at a time. No pass over the other images.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxconcept.data import DataError

CHUNK = 1024  # records read and parsed per call (and per reading thread)
SPLIT_PARTITION = {"train": 0, "validation": 1, "valid": 1, "val": 1, "test": 2}
# CelebA's own files, which TFDS's celeb_a builder reads from its manual directory when present
MANUAL_FILES = ("img_align_celeba.zip", "list_attr_celeba.txt", "list_eval_partition.txt",
                "list_landmarks_align_celeba.txt", "identity_CelebA.txt")


@dataclass(frozen=True, eq=False)
class Index:
    """Every record of a TFDS dataset, its splits concatenated as train, validation, test (then any
    others): attribute names, attrs [N, n_attr] int8 in {0, 1}, partition [N] int8 (0 train,
    1 validation, 2 test), and the records themselves (a random-access TFDS data source of
    serialized examples, indexed as attrs)."""

    source: str
    root: str
    names: tuple
    attrs: np.ndarray
    partition: np.ndarray
    records: object
    image: dict  # {the image field's key: its tf.io feature spec}

    def columns(self, attributes) -> list[int]:
        missing = [a for a in attributes if a not in self.names]
        if missing:
            raise DataError(f"data.attributes: {', '.join(map(repr, missing))} not among the attributes of "
                            f"{self.describe()}: allowed {', '.join(self.names)}")
        return [self.names.index(a) for a in attributes]

    def describe(self) -> str:
        return f"the TFDS dataset {self.source!r} in {self.root}"


def _import_tfds():
    """(tensorflow, tensorflow_datasets), imported on first use (the core library never needs them)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError(f"data.source reads a TFDS dataset through tensorflow-datasets, which cannot be imported "
                        f"({exc}): pip install 'jaxconcept[celeba]'") from None
    try:  # TF must leave the accelerators to JAX
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    return tf, tfds


def tfds_root(cfg) -> str:
    """The TFDS data directory as TFDS resolves it: data.data_dir, else $TFDS_DATA_DIR, else
    ~/tensorflow_datasets."""
    return str(Path(cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser().resolve())


def prepare_command(cfg) -> str:
    """The shell command that prepares the TFDS source of ``cfg`` for reading here."""
    return f"tfds build {cfg.source} --data_dir {tfds_root(cfg)} --file_format array_record"


def _name(cfg) -> str:
    return cfg.source.split(":")[0].split("/")[0]


def _missing_message(cfg, root: str) -> str:
    msg = (f"the TFDS dataset {cfg.source!r} is not prepared in {root} (data.data_dir={cfg.data_dir!r}); prepare "
           f"it once with: pip install 'jaxconcept[celeba]' && {prepare_command(cfg)}")
    if _name(cfg) == "celeb_a":
        msg += (f" (about 1.4 GB; if Google Drive refuses the download, or you hold CelebA's files already, put "
                f"{', '.join(MANUAL_FILES)} from the CelebA site in {Path(root) / 'downloads' / 'manual'} and run "
                "the same command)")
    return msg


def _format_message(cfg, root: str, builder) -> str:
    where = Path(builder.data_dir)
    return (f"the TFDS dataset {cfg.source!r} in {where} is prepared as {builder.info.file_format.value}, and "
            f"jaxconcept reads it by record number with tfds.data_source, which needs array_record: prepare it "
            f"again (the downloads in {Path(root) / 'downloads'} are reused) with: rm -r {where} && "
            f"{prepare_command(cfg)}; or convert it into another data directory NEW with: pip install apache-beam && "
            f"tfds convert_format --dataset_version_dir {where} --out_file_format array_record --out_dir "
            f"NEW/{where.relative_to(root)}, then set data.data_dir to NEW")


def _features(tfds, builder, source: str):
    """(image key, attribute prefix, attribute names) of a TFDS dataset: its image feature and its
    boolean attributes, in an "attributes" dict or at the top level."""
    feats = builder.info.features
    images = [k for k, f in feats.items() if isinstance(f, tfds.features.Image)]
    if not images:
        raise DataError(f"the TFDS dataset {source!r} has no image feature (features: {', '.join(feats)})")

    def flags(d):
        return tuple(k for k, f in d.items() if isinstance(f, tfds.features.Tensor) and f.shape == ()
                     and np.dtype(f.np_dtype) == np.bool_)
    nested = "attributes" in feats and isinstance(feats["attributes"], tfds.features.FeaturesDict)
    names = flags(feats["attributes"]) if nested else flags(feats)
    if not names:
        raise DataError(f"the TFDS dataset {source!r} has no boolean attributes (features: {', '.join(feats)})")
    return ("image" if "image" in images else images[0]), ("attributes/" if nested else ""), names


@functools.lru_cache(maxsize=4)
def _index(source: str, data_dir: str) -> Index:
    cfg = _Source(source, data_dir)
    _, tfds = _import_tfds()
    root = tfds_root(cfg)
    try:
        builder = tfds.builder(source, data_dir=root)
    except Exception as exc:  # noqa: BLE001 - TFDS raises several kinds for an unknown or unreadable name
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.source={source!r}: no TFDS dataset of that name is registered or prepared in {root} "
                        f"[{line}]; allowed 'celeb_a' (the default), or another TFDS dataset with an image feature "
                        "and boolean attributes") from None
    if not builder.is_prepared():
        raise DataError(_missing_message(cfg, root))
    image, prefix, names = _features(tfds, builder, source)
    splits = sorted(builder.info.splits, key=lambda s: (SPLIT_PARTITION.get(s, 3), s))
    try:
        records = builder.as_data_source("+".join(splits), deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError:  # prepared in a format without random access
        raise DataError(_format_message(cfg, root, builder)) from None
    flat = builder.info.features.tf_example_spec
    n = len(records)
    attrs = [_parse(records, {prefix + a: flat[prefix + a] for a in names}, range(lo, min(lo + CHUNK, n)))
             for lo in range(0, n, CHUNK)]
    attrs = np.concatenate([np.stack([got[prefix + a] for a in names], axis=1) for got in attrs]
                           or [np.zeros((0, len(names)))]).astype(np.int8)
    partition = np.repeat([SPLIT_PARTITION.get(s, 0) for s in splits],
                          [builder.info.splits[s].num_examples for s in splits]).astype(np.int8)
    assert len(attrs) == len(partition) == n, (len(attrs), len(partition), n)
    return Index(source, root, names, attrs, partition, records, {image: flat[image]})


@dataclass(frozen=True)
class _Source:
    source: str
    data_dir: str


def index(cfg) -> Index:
    """The index of the source ``cfg.source`` in ``cfg.data_dir`` (read once per process).
    Raises DataError: TFDS missing, the dataset unknown, not prepared, or not in array_record."""
    return _index(cfg.source, cfg.data_dir)


def source_id(cfg) -> str:
    """What identifies the source's content, from cheap file-system facts (no TFDS import)."""
    root = Path(tfds_root(cfg))
    base = root / _name(cfg)
    infos = sorted(str(p.relative_to(root)) + f":{p.stat().st_mtime_ns}" for p in base.rglob("dataset_info.json")) \
        if base.is_dir() else []
    return "|".join([cfg.source, str(root), *infos])


def _parse(records, spec: dict, positions) -> dict:
    """The fields ``spec`` ({key: tf.io feature spec}) of the records at ``positions``:
    {key: numpy [n] (bytes or int64)}."""
    tf, _ = _import_tfds()
    got = tf.io.parse_example(records.__getitems__([int(p) for p in positions]), spec)
    return {k: v.numpy() for k, v in got.items()}


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


def read_images(idx: Index, positions: np.ndarray, crop: int, size: int, out: np.ndarray) -> None:
    """Fill ``out`` (uint8 [n, size, size, 3], e.g. a memory map) with the images of the records at
    ``positions`` [n], decoded with PIL and ``preprocess``-ed; chunks of records on a few threads
    (PIL decodes and resizes without the GIL)."""
    from PIL import Image

    def chunk(lo: int) -> None:
        (blobs,) = _parse(idx.records, idx.image, positions[lo: lo + CHUNK]).values()
        for j, blob in enumerate(blobs):
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    out[lo + j] = preprocess(im.convert("RGB"), crop, size)
            except OSError as exc:
                raise DataError(f"record {positions[lo + j]} of {idx.describe()} holds no readable image "
                                f"({exc})") from None
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(chunk, range(0, len(positions), CHUNK)))
