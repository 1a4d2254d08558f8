"""Small CelebA-format datasets made on the fly, whose attributes are visible in the images.

Each listed attribute j owns a horizontal band of the (centred, square) face area: the band is
painted in the attribute's colour when it is present and mid-grey when absent, over a noisy
background. Horizontal flips leave the bands where they are, a small CNN tells the colours apart,
and ``decode`` reads the attributes back from any image of the data (uint8, any size >= 8).

``write_manual`` writes CelebA's own five files (img_align_celeba.zip of 218x178 JPEGs, the
attribute, partition, landmark and identity tables) as the CelebA site ships them;
``write_tfds_celeb_a`` puts them in a TFDS data directory's manual folder and prepares
``celeb_a`` from them with TFDS's real builder, as ``tfds build celeb_a`` does offline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ATTRS = ("Male", "Smiling", "Black_Hair", "Eyeglasses", "Wearing_Hat")
COLOURS = np.array([(230, 30, 30), (30, 220, 30), (30, 30, 230), (230, 220, 30), (220, 30, 220)], np.float64)
GREY = 128.0


def draw(attrs, rng, width: int = 64, height: int = 64) -> np.ndarray:
    """uint8 [height, width, 3]: the bands of ``attrs`` (0/1 per ATTRS) in the centred square."""
    img = rng.normal(100.0, 25.0, (height, width, 3))
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    for j, a in enumerate(attrs):
        r0, r1 = top + round(j * side / len(ATTRS)), top + round((j + 1) * side / len(ATTRS))
        colour = COLOURS[j] if a else np.full(3, GREY)
        c0, c1 = left + side // 8, left + side - side // 8
        img[r0:r1, c0:c1] = colour + rng.normal(0.0, 8.0, (r1 - r0, c1 - c0, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def decode(x) -> np.ndarray:
    """[..., S, S, 3] uint8 images of ``draw`` (square, any size) -> [..., len(ATTRS)] attributes."""
    x = np.asarray(x, np.float64)
    s = x.shape[-2]
    rows = [int((j + 0.5) * s / len(ATTRS)) for j in range(len(ATTRS))]
    centre = x[..., rows, s // 2 - max(1, s // 8): s // 2 + max(1, s // 8), :].mean(axis=-2)  # [..., A, 3]
    d_col = np.linalg.norm(centre - COLOURS, axis=-1)
    d_grey = np.linalg.norm(centre - GREY, axis=-1)
    return (d_col < d_grey).astype(np.int64)


def table(n: int, seed: int = 0) -> np.ndarray:
    """[n, len(ATTRS)] attributes: every combination of the first two equally often, the rest random."""
    rng = np.random.default_rng(seed)
    first = np.array([(i % 4) // 2 for i in range(n)]), np.array([i % 2 for i in range(n)])
    rest = rng.integers(0, 2, (n, len(ATTRS) - 2))
    return np.concatenate([np.stack(first, 1), rest], axis=1)


def write_manual(folder, n: int = 400, seed: int = 0) -> Path:
    """CelebA's files for n images in ``folder``: the ATTRS of ``table(n, seed)`` (the other
    attributes random), image i (from 1) in the test partition when i % 5 == 0, validation when
    i % 20 == 4, else training."""
    import zipfile

    from PIL import Image
    from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder as real

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    attrs = table(n, seed)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as z:
        for name, a in zip(names, attrs):
            with z.open(f"img_align_celeba/{name}", "w") as f:
                Image.fromarray(draw(a, rng, 178, 218)).save(f, "JPEG", quality=95)
    rows = []
    for name, a in zip(names, attrs):
        flags = dict(zip(real.ATTR_HEADINGS, rng.integers(0, 2, len(real.ATTR_HEADINGS))))
        flags.update(zip(ATTRS, a))
        rows.append(f"{name} " + " ".join("1" if flags[k] else "-1" for k in real.ATTR_HEADINGS))
    tables = {
        "list_attr_celeba.txt": [str(n), " ".join(real.ATTR_HEADINGS), *rows],
        "list_eval_partition.txt": [f"{name} {2 if (i + 1) % 5 == 0 else 1 if (i + 1) % 20 == 4 else 0}"
                                    for i, name in enumerate(names)],
        "list_landmarks_align_celeba.txt": [str(n), " ".join(real.LANDMARK_HEADINGS),
                                            *(f"{name} " + " ".join(["80"] * 10) for name in names)],
        "identity_CelebA.txt": [f"{name} {i % 7}" for i, name in enumerate(names)],
    }
    for fname, lines in tables.items():
        (folder / fname).write_text("\n".join(lines) + "\n")
    return folder


def write_tfds_celeb_a(data_dir, n: int = 400, seed: int = 0, file_format: str = "array_record") -> Path:
    """A prepared TFDS ``celeb_a`` in ``data_dir``: ``write_manual``'s files in its manual folder
    (downloads/manual), read by the installed celeb_a builder, which checks them against checksums
    recorded here (the real ones are the real files')."""
    import hashlib

    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder as real

    data_dir = Path(data_dir)
    manual = write_manual(data_dir / "downloads" / "manual", n, seed)
    urls = {real.IMG_ALIGNED_DATA: "img_align_celeba.zip", real.EVAL_LIST: "list_eval_partition.txt",
            real.ATTR_DATA: "list_attr_celeba.txt", real.LANDMARKS_DATA: "list_landmarks_align_celeba.txt",
            real.IDENTITY_DATA: "identity_CelebA.txt"}
    checksums = data_dir / "checksums.tsv"
    checksums.write_text("".join(f"{url}\t{(manual / f).stat().st_size}\t"
                                 f"{hashlib.sha256((manual / f).read_bytes()).hexdigest()}\t{f}\n"
                                 for url, f in urls.items()))

    class CelebA(real.Builder, skip_registration=True):
        name = "celeb_a"

        @classmethod
        def _get_pkg_dir_path(cls):
            return real.Builder._get_pkg_dir_path()

        @tfds.core.utils.classproperty
        @classmethod
        def _checksums_path(cls):
            return epath.Path(checksums)

    CelebA(data_dir=str(data_dir), file_format=file_format).download_and_prepare()
    return data_dir
