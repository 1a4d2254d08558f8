"""Small CelebA-format datasets made on the fly, whose attributes are visible in the images.

Each listed attribute j owns a horizontal band of the (centred, square) face area: the band is
painted in the attribute's colour when it is present and mid-grey when absent, over a noisy
background. Horizontal flips leave the bands where they are, a small CNN tells the colours apart,
and ``decode`` reads the attributes back from any image of the data (uint8, any size >= 8).

``write_folder`` writes a folder dataset (PNG files, list_attr_celeba.txt, list_eval_partition.txt);
``write_tfds_celeb_a`` writes a prepared TFDS ``celeb_a`` (the real builder's features and version,
218x178 JPEGs) into a TFDS data directory, so the real TFDS reading path can run offline.
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


def write_folder(root, n: int = 400, seed: int = 0, size: int = 64) -> Path:
    """A folder dataset of n images: {root}/img_align_celeba/NNNNNN.png, list_attr_celeba.txt with
    ATTRS, list_eval_partition.txt (every fifth image in the test partition)."""
    from PIL import Image

    root = Path(root)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    attrs = table(n, seed)
    names = [f"{i + 1:06d}.png" for i in range(n)]
    for name, a in zip(names, attrs):
        Image.fromarray(draw(a, rng, size, size)).save(root / "img_align_celeba" / name)
    lines = [str(n), " ".join(ATTRS)] + [f"{name} " + " ".join("1" if v else "-1" for v in a)
                                         for name, a in zip(names, attrs)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(f"{name} {2 if i % 5 == 4 else 0}"
                                                            for i, name in enumerate(names)) + "\n")
    return root


def write_tfds_celeb_a(data_dir, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
    """A prepared TFDS ``celeb_a`` in ``data_dir`` (the installed builder's features and version),
    generated here instead of downloaded: splits train / validation / test."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder as real

    class FakeCelebA(real.Builder, skip_registration=True):
        name = "celeb_a"

        @classmethod
        def _get_pkg_dir_path(cls):
            return real.Builder._get_pkg_dir_path()

        def _split_generators(self, dl_manager):
            return [tfds.core.SplitGenerator(name=s, gen_kwargs={"n": k, "offset": o})
                    for s, k, o in (("train", n_train, 0), ("validation", 8, n_train), ("test", n_test, n_train + 8))]

        def _generate_examples(self, n, offset):
            rng = np.random.default_rng(seed + offset)
            attrs = table(n, seed + offset)
            for i in range(n):
                flags = {k: bool(rng.integers(2)) for k in real.ATTR_HEADINGS}
                flags.update({k: bool(v) for k, v in zip(ATTRS, attrs[i])})
                yield offset + i, {"image": draw(attrs[i], rng, 178, 218),
                                   "landmarks": {k: 0 for k in real.LANDMARK_HEADINGS},
                                   "attributes": flags, "identity": {"Identity_No": 0}}

    FakeCelebA(data_dir=str(data_dir)).download_and_prepare()
    return Path(data_dir)
