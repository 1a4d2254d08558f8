"""The rules that tie config fields together (each field's own type, bounds and choices are
declared on it, in ``sections``). ``validate`` runs on every single run a config describes:
member 0, and each other value of every sweep axis."""
from __future__ import annotations

import itertools
import math

from jaxconcept.config.checks import invalid

MAX_CLASSES = 4096  # concept-grid size bound (a typo such as data.dim=40 must not exhaust memory)
MAX_MEMBER_BYTES = 4 << 30  # rendered dataset of one member, float32


def _images(d):
    """(number of classes, concept names, floats per rendered example) of image data."""
    if len(d.values) != len(d.concepts):
        raise invalid("data.values", d.values, f"one integer >= 2 per concept in data.concepts ({len(d.concepts)})")
    if "shape" in d.concepts and d.values[d.concepts.index("shape")] != 2:
        raise invalid("data.values", d.values, "exactly 2 values for shape (circle, triangle)")
    if math.prod(d.values) > MAX_CLASSES:
        raise invalid("data.values", d.values, f"at most {MAX_CLASSES} classes in all")
    return math.prod(d.values), d.concepts, 3 * d.image_size ** 2


def _celeba(d):
    return 2 ** len(d.attributes), d.attributes, 0  # streamed from the host, never rendered on the device whole


def _vector(d):
    n_classes = d.perdim ** d.dim if d.dim <= 64 and d.perdim <= MAX_CLASSES else MAX_CLASSES + 1
    if n_classes > MAX_CLASSES:
        raise invalid("data.dim", d.dim, f"a grid of at most {MAX_CLASSES} classes (data.perdim ** data.dim)")
    for key in ("m", "s"):
        if len(getattr(d, key)) != d.dim:
            raise invalid(f"data.{key}", getattr(d, key),
                          f"a list of {d.dim} positive finite numbers (data.dim), or a list of such lists")
    if any(c >= n_classes for c in d.train_classes):
        raise invalid("data.train_classes", d.train_classes, f"class indices in [0, {n_classes - 1}]")
    if set(d.train_classes) & set(d.held_out):
        raise invalid("data.held_out", d.held_out, "classes not also listed in data.train_classes")
    if not set(d.train_classes or default_train_classes(d.dim, d.perdim)) - set(d.held_out):
        raise invalid("data.held_out", d.held_out, "a choice that leaves at least one training class")
    return n_classes, tuple(f"dim{i}" for i in range(d.dim)), d.dim + d.dim_nuisance


def default_train_classes(dim: int, perdim: int) -> tuple:
    """The vector data's training classes when ``data.train_classes`` is empty: the grid points
    (row-major class indices over ``dim`` concepts of ``perdim`` values) with at most one non-zero
    value index, i.e. the origin and each concept's values alone."""
    return tuple(c for c, g in enumerate(itertools.product(range(perdim), repeat=dim)) if sum(v != 0 for v in g) <= 1)


def _data(d):
    n_classes, concept_names, x_size = {"images": _images, "celeba": _celeba, "vector": _vector}[d.kind](d)
    if any(c >= n_classes for c in d.held_out):
        raise invalid("data.held_out", d.held_out,
                      f"class indices in [0, {n_classes - 1}] ({n_classes} classes from the concept grid)")
    if len(set(d.held_out)) >= n_classes:
        raise invalid("data.held_out", d.held_out, "at least one class left for training")
    if any(c not in concept_names for c in d.masked):
        raise invalid("data.masked", d.masked, "concepts from " + ", ".join(concept_names))
    if d.mask_prob != 1 and d.kind == "celeba":
        raise invalid("data.mask_prob", d.mask_prob, "1 for data.kind='celeba' (its conditioning is never masked)")
    n_examples = n_classes * (d.n_per_class * (1 + d.val_frac)) + n_classes * d.n_test
    if n_examples * x_size * 4 > MAX_MEMBER_BYTES:
        raise invalid("data.n_per_class", d.n_per_class,
                      f"a dataset of at most {MAX_MEMBER_BYTES >> 30} GiB per member "
                      f"(this one: {n_examples * x_size * 4 / 2 ** 30:.1f} GiB from {n_classes} classes)")


def _model(m, d):
    if m.arch == "unet" and d.kind == "vector":
        raise invalid("model.arch", m.arch, "'mlp' for vector data (data.kind='vector')")
    if m.arch == "mlp" and d.kind != "vector":
        raise invalid("model.arch", m.arch, "'unet' for image data (data.kind='images' or 'celeba')")
    if m.arch == "unet":
        widths = f"a divisor of every level's width ({m.ch}x{m.ch_mult})"
        if any((m.ch * mult) % m.norm_groups for mult in m.ch_mult):
            raise invalid("model.norm_groups", m.norm_groups, widths)
        if any((m.ch * mult) % m.num_heads for mult in m.ch_mult):
            raise invalid("model.num_heads", m.num_heads, widths)
        if d.image_size % (2 ** (len(m.ch_mult) - 1)):
            raise invalid("model.ch_mult", m.ch_mult, f"at most log2 of data.image_size={d.image_size} levels")
    if not m.gamma_min < m.gamma_max:
        raise invalid("model.gamma_max", m.gamma_max, f"a number > model.gamma_min={m.gamma_min}")


def validate(cfg) -> None:
    """Raise ConfigError on the first rule ``cfg`` (its member-0 values) breaks; None when all hold."""
    _data(cfg.data)
    _model(cfg.model, cfg.data)
    if any(s > cfg.train.steps for s in cfg.eval.steps):
        raise invalid("eval.steps", cfg.eval.steps, f"increasing distinct integers in [0, train.steps={cfg.train.steps}]")
