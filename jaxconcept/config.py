"""Configs: frozen dataclasses, presets, file loading, ``--set`` overrides, validation.

A ``Config`` describes one run *or* a sweep: the fields listed in ``SWEEP_FIELDS`` may hold a
list of values (a tuple of tuples for tuple-valued fields), and ``members(cfg)`` expands the
product of those lists and ``seeds`` into one scalar config per sweep member.

Every error is a ``ConfigError`` naming the dotted field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

IMAGE_CONCEPTS = ("shape", "colour", "size", "background")  # compositional ones, SPEC A1 order


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """What the data-generating process draws (SPEC A1 for images, A6 for vectors)."""

    kind: str = "images"  # "images" | "vector" | "celeba" (attribute-labelled photographs)
    # --- images (SPEC A1) ---
    concepts: tuple = ("colour", "size")  # compositional concepts, a subset of IMAGE_CONCEPTS
    values: tuple = (2, 2)  # number of values per compositional concept
    sep_col: Any = 0.2  # (0, 0.8]; a list makes a sweep
    sep_size: Any = 0.4  # (0, 0.4]; a list makes a sweep
    image_size: int = 32
    blur_sigma: float = 1.0  # pixels
    pixel_noise: float = 0.001
    # --- vector (SPEC A6) ---
    dim: int = 2  # concept dimensions
    perdim: int = 2  # values per concept dimension
    m: Any = (1.0, 1.0)  # per-dimension separation of neighbouring class means; nested = sweep
    s: Any = (0.05, 0.05)  # per-dimension spread (std); nested = sweep
    normalize: bool = True  # divide by the grid's extent so every concept spans a unit range
    dim_nuisance: int = 1
    nuisance: str = "gaussian"  # "gaussian" | "bimodal"
    cond_mode: str = "classy"  # "classy" | "mean" | "observed"
    cond_noise: float = 0.0  # std of the noise added to "observed" conditioning
    # --- celeba (attribute-labelled photographs: jaxconcept/data/celeba.py) ---
    attributes: tuple = ("Male", "Smiling")  # binary attributes, each a two-valued concept (0 absent, 1 present)
    source: str = "celeb_a"  # a TFDS dataset name, prepared in the array_record format (data/celeba_source.py)
    data_dir: str = ""  # TFDS data directory ("" = $TFDS_DATA_DIR, else ~/tensorflow_datasets)
    crop: int = 0  # centre-crop side in source pixels before resizing (0 = the largest centred square)
    augment: bool = True  # random horizontal flips and colour jitter on training batches, on device
    jitter: float = 0.1  # colour-jitter strength for brightness, contrast, saturation and hue
    # --- all ---
    held_out: tuple = (3,)  # held-out class indices (row-major over the concepts); vectors: () = default
    train_classes: tuple = ()  # vectors: explicit training classes; () = at most one non-zero index
    masked: tuple = ()  # concepts whose conditioning entries are zeroed (underspecification)
    n_per_class: int = 2048  # training images per training class
    val_frac: float = 0.15
    n_test: int = 32  # test examples per held-out class, for the held-out loss at evaluation


@dataclass(frozen=True)
class ModelConfig:
    """Score network and diffusion process (SPEC A2, A6)."""

    arch: str = "unet"  # "unet" | "mlp"
    ch: int = 64
    ch_mult: tuple = (1, 2, 4)
    num_res_blocks: int = 2
    num_heads: int = 4
    norm_groups: int = 8
    dropout: float = 0.1
    mid_attention: bool = True
    hidden: tuple = (1024,)  # mlp widths
    time_embed_dim: int = 64
    embed_dim: int = 256
    conditioning: str = "sep_mlp"  # "sep_mlp" | "common_linear" | "common_zerolinear"
    gamma_min: float = -5.0
    gamma_max: float = 10.0  # w initialised to gamma_max - gamma_min = 15 (SPEC A2)
    data_noise: float = 0.001  # std of the reconstruction likelihood
    init_scale: float = 1.0  # multiplies every initial weight (ablation)
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    conv: str = "auto"  # convolutions: "xla" | "explicit" (canonical convs and matmuls) | "auto" (explicit on CPU)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 0.01
    ema: float = 0.0  # decay of an exponential moving average of the parameters, used for evaluation (0 = off)
    p_cfg: float = 0.0  # probability of dropping the conditioning (classifier-free guidance)
    steps_per_call: int = 100  # K steps per jitted call (lax.scan)
    scan_unroll: int = 0  # lax.scan unroll (0 = none); conv nets on CPU step in a traced Python loop instead
    batches: str = "epochs"  # "epochs": shuffled epochs without replacement, short last batch (the reference); "replacement"
    checkpoint_every: int = 1000  # steps between train-state checkpoints (and one at the last step); evaluation points save samples and parameters, not checkpoints
    keep_checkpoints: int = 3
    strategy: str = "auto"  # how members are stacked: "auto" | "vmap" | "map" (chunks) | "unroll" (a traced loop)
    map_batch_size: int = 1  # members per chunk for strategy "map"
    memory_budget: float = 0.0  # bytes of device memory "auto" may plan for (0 = the device's free memory)


@dataclass(frozen=True)
class EvalConfig:
    n_points: int = 60  # evaluation checkpoints, evenly spaced in sqrt(step)
    first: int = 500  # the reference's first evaluation step
    steps: tuple = ()  # explicit evaluation steps; overrides n_points/first when given
    n_samples: int = 32  # generated per class (held-out included)
    sampler_steps: int = 50
    w_cfg: float = 1.0  # guidance eps(null) + w (eps(cond) - eps(null)) as the reference; 1 = plain conditional
    sampler_output: str = "z0"  # "z0" as the reference returns, or "mean" = z0 / alpha0 (the decoder's mean)
    prompts: str = "random"  # training classes' prompts: "random" inside each class's box (the reference) | "mean"
    val_batches: int = 0  # 0 = the loss on the whole validation set (the reference); k = k random batches
    vector_band: float = 0.0  # vectors: also require |x - value| <= k std to count as correct (0 = nearest value only)
    save_params: bool = True  # keep parameters at every evaluation point (needed by `elicit`)
    sample_dtype: str = "float32"  # samples/step_*.npz: "float32" as computed, or "float16" (refused per step when rounding could change a classification)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seeds: Any = (0,)
    name: str = ""

    def __post_init__(self):
        validate(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
SWEEP_FIELDS = ("data.sep_col", "data.sep_size", "data.m", "data.s", "data.attributes")
_CHOICES = {
    "data.kind": ("images", "vector", "celeba"),
    "data.nuisance": ("gaussian", "bimodal"),
    "data.cond_mode": ("classy", "mean", "observed"),
    "model.arch": ("unet", "mlp"),
    "model.conditioning": ("sep_mlp", "common_linear", "common_zerolinear"),
    "model.dtype": ("float32", "bfloat16"),
    "model.conv": ("auto", "xla", "explicit"),
    "train.strategy": ("auto", "vmap", "map", "unroll"),
    "train.batches": ("epochs", "replacement"),
    "eval.sampler_output": ("z0", "mean"),
    "eval.prompts": ("random", "mean"),
    "eval.sample_dtype": ("float32", "float16"),
}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _err(name, value, allowed):
    raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def _is_num(v):
    """A finite real number (not a bool, not NaN or infinite)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def sweep_values(cfg: Config, key: str) -> list:
    """The values a sweep field takes (a one-element list when it is not swept)."""
    section, name = key.split(".")
    v = getattr(getattr(cfg, section), name)
    if name in ("m", "s"):
        return [tuple(x) for x in v] if v and isinstance(v[0], (tuple, list)) else [tuple(v)]
    if name == "attributes":
        return [tuple(x) for x in v] if v and isinstance(v[0], (tuple, list)) else [tuple(v)]
    return list(v) if isinstance(v, (tuple, list)) else [v]


def _check_type(name, value, default):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "true or false"
    elif isinstance(default, int):
        ok = _is_int(value)
        kind = "an integer"
    elif isinstance(default, float):
        ok = _is_num(value)
        kind = "a finite number"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        kind = "a string"
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple)
        kind = "a list"
        if ok and default and all(_is_int(x) for x in default):  # a list of integers: no true/false, no 1.5
            if not all(_is_int(x) for x in value):
                raise ConfigError(f"{name}={_untuple(value)!r} has the wrong type: expected a list of integers")
        if ok and default and all(isinstance(x, str) for x in default):
            if not all(isinstance(x, str) for x in value):
                raise ConfigError(f"{name}={_untuple(value)!r} has the wrong type: expected a list of strings")
    else:
        return
    if not ok:
        raise ConfigError(f"{name}={_untuple(value)!r} has the wrong type: expected {kind}")


MAX_CLASSES = 4096  # concept-grid size bound (a typo such as data.dim=40 must not exhaust memory)
MAX_MEMBER_BYTES = 4 << 30  # rendered dataset of one member, float32


def validate(cfg: Config) -> None:
    """Raise ConfigError on the first invalid field; return None when all is well."""
    for sname, cls in SECTIONS.items():
        sec = getattr(cfg, sname)
        if not isinstance(sec, cls):
            raise ConfigError(f"{sname} must be a {cls.__name__}, got {type(sec).__name__}")
        for f in fields(cls):
            key = f"{sname}.{f.name}"
            if key in SWEEP_FIELDS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            _check_type(key, getattr(sec, f.name), default)
            if key in _CHOICES and getattr(sec, f.name) not in _CHOICES[key]:
                _err(key, getattr(sec, f.name), "one of " + ", ".join(_CHOICES[key]))
    if not isinstance(cfg.name, str):
        raise ConfigError(f"name={_untuple(cfg.name)!r} has the wrong type: expected a string")
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval

    seeds = cfg.seeds if isinstance(cfg.seeds, tuple) else None
    if not seeds or not all(_is_int(s) and 0 <= s < 2 ** 31 for s in seeds):
        _err("seeds", _untuple(cfg.seeds), "a non-empty list of integers in [0, 2**31)")
    if len(set(seeds)) != len(seeds):
        _err("seeds", _untuple(cfg.seeds), "distinct seeds")

    for key in SWEEP_FIELDS:  # an empty list would make a sweep of no members
        raw = getattr(d, key.split(".")[1])
        if isinstance(raw, tuple) and not raw:
            _err(key, [], "a value or a non-empty list of values")
    for key, lo, hi in (("data.sep_col", 0.0, 0.8), ("data.sep_size", 0.0, 0.4)):
        vals = sweep_values(cfg, key)
        for v in vals:
            if not _is_num(v) or not (lo < v <= hi):
                _err(key, _untuple(getattr(d, key.split(".")[1])), f"numbers in ({lo}, {hi}], or a list of them")
    for key in ("data.m", "data.s"):
        raw = getattr(d, key.split(".")[1])
        if not isinstance(raw, tuple) or not raw:
            _err(key, _untuple(raw), f"a list of {d.dim} positive numbers (a list of such lists sweeps)")
        for v in sweep_values(cfg, key):
            if len(v) != d.dim or not all(_is_num(x) and x > 0 for x in v):
                _err(key, _untuple(raw), f"a list of {d.dim} positive finite numbers (data.dim), or a list of such lists")
    attrs = d.attributes
    if not isinstance(attrs, tuple) or not attrs:
        _err("data.attributes", _untuple(attrs), "a non-empty list of attribute names (a list of such lists sweeps)")
    for v in sweep_values(cfg, "data.attributes"):
        if not v or not all(isinstance(a, str) and a for a in v) or len(set(v)) != len(v):
            _err("data.attributes", _untuple(attrs), "distinct attribute names, or a list of such lists")
    if len({len(v) for v in sweep_values(cfg, "data.attributes")}) != 1:
        _err("data.attributes", _untuple(attrs), "lists of the same length in a sweep (the concept grid is shared)")

    if d.kind == "images":
        if not d.concepts or any(c not in IMAGE_CONCEPTS for c in d.concepts):
            _err("data.concepts", d.concepts, "a non-empty list from " + ", ".join(IMAGE_CONCEPTS))
        if list(d.concepts) != sorted(d.concepts, key=IMAGE_CONCEPTS.index) or len(set(d.concepts)) != len(d.concepts):
            _err("data.concepts", d.concepts, "distinct concepts in the order " + ", ".join(IMAGE_CONCEPTS))
        if len(d.values) != len(d.concepts) or not all(_is_int(v) and v >= 2 for v in d.values):
            _err("data.values", d.values, f"one integer >= 2 per concept in data.concepts ({len(d.concepts)})")
        if "shape" in d.concepts and d.values[d.concepts.index("shape")] != 2:
            _err("data.values", d.values, "exactly 2 values for shape (circle, triangle)")
        n_classes = math.prod(d.values)
        if n_classes > MAX_CLASSES:
            _err("data.values", d.values, f"at most {MAX_CLASSES} classes in all")
        if not 8 <= d.image_size <= 512:
            _err("data.image_size", d.image_size, "an integer in [8, 512]")
        if d.blur_sigma < 0:
            _err("data.blur_sigma", d.blur_sigma, "a number >= 0")
        if d.pixel_noise < 0:
            _err("data.pixel_noise", d.pixel_noise, "a number >= 0")
        concept_names = d.concepts
        x_size = 3 * d.image_size ** 2
    elif d.kind == "celeba":
        n_classes = 2 ** len(sweep_values(cfg, "data.attributes")[0])
        if n_classes > MAX_CLASSES:
            _err("data.attributes", _untuple(attrs), f"at most {int(math.log2(MAX_CLASSES))} attributes")
        if not 8 <= d.image_size <= 512:
            _err("data.image_size", d.image_size, "an integer in [8, 512]")
        if d.crop < 0:
            _err("data.crop", d.crop, "an integer >= 0 (0 = the largest centred square)")
        if not 0 <= d.jitter <= 0.5:
            _err("data.jitter", d.jitter, "a number in [0, 0.5]")
        concept_names = sweep_values(cfg, "data.attributes")[0]
        x_size = 0  # streamed from the host, never rendered on the device as a whole
    else:
        if d.dim < 2:
            _err("data.dim", d.dim, "an integer >= 2")
        if d.perdim < 2:
            _err("data.perdim", d.perdim, "an integer >= 2")
        n_classes = d.perdim ** d.dim if d.dim <= 64 and d.perdim <= MAX_CLASSES else MAX_CLASSES + 1
        if n_classes > MAX_CLASSES:
            _err("data.dim", d.dim, f"a grid of at most {MAX_CLASSES} classes (data.perdim ** data.dim)")
        if not 0 <= d.dim_nuisance <= 4096:
            _err("data.dim_nuisance", d.dim_nuisance, "an integer in [0, 4096]")
        if d.cond_noise < 0:
            _err("data.cond_noise", d.cond_noise, "a number >= 0")
        concept_names = tuple(f"dim{i}" for i in range(d.dim))
        for c in d.train_classes:
            if not _is_int(c) or not 0 <= c < n_classes:
                _err("data.train_classes", d.train_classes, f"class indices in [0, {n_classes - 1}]")
        x_size = d.dim + d.dim_nuisance
    for c in d.held_out:
        if not _is_int(c) or not 0 <= c < n_classes:
            _err("data.held_out", d.held_out,
                 f"class indices in [0, {n_classes - 1}] ({n_classes} classes from the concept grid)")
    if len(set(d.held_out)) >= n_classes:
        _err("data.held_out", d.held_out, "at least one class left for training")
    if d.kind == "vector":
        if len(set(d.train_classes)) != len(d.train_classes):
            _err("data.train_classes", d.train_classes, "distinct class indices")
        if d.train_classes and set(d.train_classes) & set(d.held_out):
            _err("data.held_out", d.held_out, "classes not also listed in data.train_classes")
        from jaxconcept.data.vector import default_train_classes
        train = set(d.train_classes or default_train_classes(d.dim, d.perdim)) - set(d.held_out)
        if not train:
            _err("data.held_out", d.held_out, "a choice that leaves at least one training class")
    for c in d.masked:
        if c not in concept_names:
            _err("data.masked", d.masked, "concepts from " + ", ".join(concept_names))
    if d.n_per_class < 2:
        _err("data.n_per_class", d.n_per_class, "an integer >= 2")
    if not 0.0 <= d.val_frac < 1.0:
        _err("data.val_frac", d.val_frac, "a number in [0, 1)")
    if d.n_test < 1:
        _err("data.n_test", d.n_test, "a positive integer")
    n_examples = n_classes * (d.n_per_class * (1 + d.val_frac)) + n_classes * d.n_test
    if n_examples * x_size * 4 > MAX_MEMBER_BYTES:
        _err("data.n_per_class", d.n_per_class,
             f"a dataset of at most {MAX_MEMBER_BYTES >> 30} GiB per member "
             f"(this one: {n_examples * x_size * 4 / 2 ** 30:.1f} GiB from {n_classes} classes)")

    if m.arch == "unet" and d.kind == "vector":
        _err("model.arch", m.arch, "'mlp' for vector data (data.kind='vector')")
    if m.arch == "mlp" and d.kind != "vector":
        _err("model.arch", m.arch, "'unet' for image data (data.kind='images' or 'celeba')")
    for key, v in (("model.ch", m.ch), ("model.num_res_blocks", m.num_res_blocks),
                   ("model.num_heads", m.num_heads), ("model.norm_groups", m.norm_groups),
                   ("model.time_embed_dim", m.time_embed_dim), ("model.embed_dim", m.embed_dim)):
        if v < 1:
            _err(key, v, "a positive integer")
    if not m.ch_mult or not all(_is_int(x) and x >= 1 for x in m.ch_mult):
        _err("model.ch_mult", m.ch_mult, "a non-empty list of positive integers")
    if m.arch == "unet":
        for mult in m.ch_mult:
            if (m.ch * mult) % m.norm_groups:
                _err("model.norm_groups", m.norm_groups, f"a divisor of every level's width ({m.ch}x{m.ch_mult})")
            if (m.ch * mult) % m.num_heads:
                _err("model.num_heads", m.num_heads, f"a divisor of every level's width ({m.ch}x{m.ch_mult})")
        if d.image_size % (2 ** (len(m.ch_mult) - 1)):
            _err("model.ch_mult", m.ch_mult, f"at most log2 of data.image_size={d.image_size} levels")
    if not m.hidden or not all(_is_int(x) and x >= 1 for x in m.hidden):
        _err("model.hidden", m.hidden, "a non-empty list of positive integers")
    if m.time_embed_dim % 2:
        _err("model.time_embed_dim", m.time_embed_dim, "an even integer")
    if not 0.0 <= m.dropout < 1.0:
        _err("model.dropout", m.dropout, "a number in [0, 1)")
    if not m.gamma_min < m.gamma_max:
        _err("model.gamma_max", m.gamma_max, f"a number > model.gamma_min={m.gamma_min}")
    if m.data_noise <= 0:
        _err("model.data_noise", m.data_noise, "a positive number")
    if m.init_scale <= 0:
        _err("model.init_scale", m.init_scale, "a positive number")

    for key, v in (("train.steps", t.steps), ("train.batch_size", t.batch_size),
                   ("train.steps_per_call", t.steps_per_call), ("train.checkpoint_every", t.checkpoint_every),
                   ("train.keep_checkpoints", t.keep_checkpoints), ("train.map_batch_size", t.map_batch_size)):
        if v < 1:
            _err(key, v, "a positive integer")
    if t.steps >= 2 ** 31:
        _err("train.steps", t.steps, "an integer below 2**31")
    if t.scan_unroll < 0:
        _err("train.scan_unroll", t.scan_unroll, "an integer >= 0 (0 = no unrolling)")
    if t.batch_size % 2:
        _err("train.batch_size", t.batch_size, "an even integer (antithetic time sampling)")
    if t.lr <= 0:
        _err("train.lr", t.lr, "a positive number")
    if t.weight_decay < 0:
        _err("train.weight_decay", t.weight_decay, "a number >= 0")
    if t.grad_clip <= 0:
        _err("train.grad_clip", t.grad_clip, "a positive number")
    if not 0 <= t.ema < 1:
        _err("train.ema", t.ema, "a decay in [0, 1) (0 = no moving average)")
    if not 0.0 <= t.p_cfg < 1.0:
        _err("train.p_cfg", t.p_cfg, "a number in [0, 1)")
    if t.memory_budget < 0:
        _err("train.memory_budget", t.memory_budget, "bytes >= 0 (0 = the device's free memory)")

    if e.n_points < 1:
        _err("eval.n_points", e.n_points, "a positive integer")
    if e.first < 1:
        _err("eval.first", e.first, "a positive integer (evaluation starts at min(eval.first, train.steps))")
    if any(not _is_int(s) or not 0 <= s <= t.steps for s in e.steps) or list(e.steps) != sorted(set(e.steps)):
        _err("eval.steps", e.steps, f"increasing distinct integers in [0, train.steps={t.steps}]")
    if e.n_samples < 1:
        _err("eval.n_samples", e.n_samples, "a positive integer")
    if e.sampler_steps < 1:
        _err("eval.sampler_steps", e.sampler_steps, "a positive integer")
    if e.w_cfg < 0:
        _err("eval.w_cfg", e.w_cfg, "a number >= 0 (1 = plain conditional sampling)")
    if e.val_batches < 0:
        _err("eval.val_batches", e.val_batches, "an integer >= 0 (0 = the whole validation set)")
    if e.vector_band < 0:
        _err("eval.vector_band", e.vector_band, "a number >= 0 (0 = nearest value only)")


# --------------------------------------------------------------------------------------------
# Dicts, files, overrides
# --------------------------------------------------------------------------------------------
def _tuplify(v):
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


def _untuple(v):
    if isinstance(v, tuple):
        return [_untuple(x) for x in v]
    return v


def to_dict(cfg: Config) -> dict:
    """JSON-ready nested dict (tuples become lists)."""
    return _untuple_dict(dataclasses.asdict(cfg))


def _untuple_dict(d):
    return {k: _untuple_dict(v) if isinstance(v, dict) else _untuple(v) for k, v in d.items()}


def from_dict(d: dict, base: Config | None = None) -> Config:
    """Build a Config from a nested dict, starting from ``base`` (default: ``Config()``).

    Unknown keys and wrong types raise ConfigError naming the dotted key.
    """
    base = base or Config()
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
    top = {f.name for f in fields(Config)}
    kw = {}
    for k, v in d.items():
        if k not in top:
            raise ConfigError(f"unknown config key {k!r}: allowed {', '.join(sorted(top))}")
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{k} must be a mapping of fields, got {v!r}")
            sec = getattr(base, k)
            names = {f.name for f in fields(SECTIONS[k])}
            for kk in v:
                if kk not in names:
                    raise ConfigError(f"unknown config key '{k}.{kk}': allowed {', '.join(sorted(names))}")
            kw[k] = replace(sec, **{kk: _tuplify(vv) for kk, vv in v.items()})
        elif k == "seeds":
            kw[k] = _tuplify(v) if isinstance(v, (list, tuple)) else (v,)
        else:
            kw[k] = v
    return replace(base, **kw)


def save(cfg: Config, path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load(path, base: Config | None = None) -> Config:
    """Load a JSON config file (any subset of fields; the rest from ``base`` or defaults).

    A file may name a preset with a top-level ``"preset": NAME`` key; its fields override it.
    Top-level keys starting with ``_`` (e.g. ``"_doc"``) are comments.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a file")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if isinstance(d, dict):  # top-level keys starting with "_" are comments
        d = {k: v for k, v in d.items() if not k.startswith("_")}
    if isinstance(d, dict) and "preset" in d:
        base = preset(d.pop("preset"))
    return from_dict(d, base)


def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, lists, true/false), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def override(cfg: Config, assignments) -> Config:
    """Apply ``["section.field=value", ...]`` (``seeds=[0,1]`` and ``name=x`` at top level).

    All assignments are applied together and validated once, so their order does not matter.
    """
    changes: dict = {}
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"--set {a!r}: expected KEY=VALUE, e.g. data.sep_col=0.3")
        key, text = a.split("=", 1)
        parts = key.strip().split(".")
        value = parse_value(text)
        if len(parts) == 1:
            changes[parts[0]] = value
        elif len(parts) == 2:
            sec = changes.setdefault(parts[0], {})
            if not isinstance(sec, dict):
                raise ConfigError(f"--set {a!r}: {parts[0]} is a section; set its fields as {parts[0]}.FIELD")
            sec[parts[1]] = value
        else:
            raise ConfigError(f"--set {a!r}: keys are SECTION.FIELD (e.g. data.sep_col) or a top-level field")
    return from_dict(changes, cfg) if changes else cfg


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------
def members(cfg: Config) -> list[Config]:
    """Expand a sweep into one config per member: product over SWEEP_FIELDS, then seeds.

    Member order: row-major over (data.sep_col, data.sep_size, data.m, data.s, data.attributes, seed).
    Each member has scalar sweep fields and a single seed.
    """
    axes = [sweep_values(cfg, k) for k in SWEEP_FIELDS] + [list(cfg.seeds)]
    out = []
    for sc, ss, mm, s, attrs, seed in itertools.product(*axes):
        data = replace(cfg.data, sep_col=sc, sep_size=ss, m=mm, s=s, attributes=attrs)
        out.append(replace(cfg, data=data, seeds=(seed,)))
    return out


def swept_fields(cfg: Config) -> list[str]:
    """The sweep fields (and 'seed') that take more than one value."""
    out = [k for k in SWEEP_FIELDS if len(sweep_values(cfg, k)) > 1]
    return out + (["seed"] if len(cfg.seeds) > 1 else [])


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def _p_2x2():
    """SPEC A1/A2: colour x size, sep_col 0.2, sep_size 0.4, class 3 (blue-small) held out."""
    return Config(name="2x2")


def _p_2x2x2():
    """Colour x size x background; the held-out class is blue-small on the dark background."""
    return Config(name="2x2x2", data=DataConfig(concepts=("colour", "size", "background"), values=(2, 2, 2),
                                                held_out=(7,)))


def _p_2x2_small():
    """The 2x2 data at 16x16 with a small U-Net (widths 16/32, one ResNet block per level), batch 64:
    a CPU-sized image run, and the small config of benchmarks/train_bench.py."""
    c = _p_2x2()
    return replace(c, name="2x2_small", data=replace(c.data, image_size=16),
                   model=replace(c.model, ch=16, ch_mult=(1, 2), num_res_blocks=1))


def _p_vec2x2():
    """SPEC A6: 2 concept dimensions, 2 values each, one nuisance dimension, MLP score network."""
    return Config(
        name="vec2x2",
        data=DataConfig(kind="vector", dim=2, perdim=2, m=(1.0, 1.0), s=(0.05, 0.05), held_out=(),
                        n_per_class=1024),
        model=ModelConfig(arch="mlp", gamma_max=10.0, dropout=0.0),
        train=TrainConfig(batch_size=32, steps=20000),
        eval=EvalConfig(n_samples=128),
    )


def _p_vec2x2x2():
    c = _p_vec2x2()
    return replace(c, name="vec2x2x2", data=replace(c.data, dim=3, m=(1.0, 1.0, 1.0), s=(0.05, 0.05, 0.05)))


def _p_tiny():
    """A few-second image config for tests: 16x16, a small U-Net, few images and steps."""
    return Config(
        name="tiny",
        data=DataConfig(image_size=16, n_per_class=32),
        model=ModelConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_heads=2, norm_groups=4,
                          time_embed_dim=16, embed_dim=32),
        train=TrainConfig(steps=20, batch_size=8, steps_per_call=5, checkpoint_every=10),
        eval=EvalConfig(n_points=2, first=10, n_samples=4, sampler_steps=4),
    )


def _p_vec_tiny():
    c = _p_vec2x2()
    return replace(c, name="vec_tiny", data=replace(c.data, n_per_class=64),
                   model=replace(c.model, hidden=(64,), time_embed_dim=16, embed_dim=32),
                   train=replace(c.train, steps=20, steps_per_call=5, checkpoint_every=10),
                   eval=EvalConfig(n_points=2, first=10, n_samples=16, sampler_steps=8))


def _p_celeba():
    """SPEC A5, the reference's CelebA runs: Male x Smiling with smiling women (0, 1) held out, 64x64
    faces, U-Net 64/128/256 (2 ResNet blocks, mid attention, GroupNorm of 4 groups), AdamW lr 1e-3
    and weight decay 1e-5, batch 64, 2 M steps, 60 evaluation points spaced in sqrt(step), 30,000
    images per training combination (5 % of them kept back for the validation loss)."""
    return Config(
        name="celeba",
        data=DataConfig(kind="celeba", attributes=("Male", "Smiling"), held_out=(1,), source="celeb_a", image_size=64,
                        n_per_class=30000, val_frac=0.05, n_test=32),
        model=ModelConfig(ch=64, ch_mult=(1, 2, 4), num_res_blocks=2, mid_attention=True, norm_groups=4,
                          gamma_min=-5.0, gamma_max=10.0, data_noise=1e-3),
        train=TrainConfig(steps=2_000_000, batch_size=64, lr=1e-3, weight_decay=1e-5, checkpoint_every=10_000),
        eval=EvalConfig(n_points=60, first=500, n_samples=32),
    )


def _p_celeba_tiny():
    """A few-second CelebA-kind config for tests: 16x16, a small U-Net, 40 images per combination."""
    c = _p_celeba()
    return replace(c, name="celeba_tiny", data=replace(c.data, image_size=16, n_per_class=40, n_test=8),
                   model=ModelConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_heads=2, norm_groups=4,
                                     time_embed_dim=16, embed_dim=32),
                   train=replace(c.train, steps=20, batch_size=8, steps_per_call=5, checkpoint_every=10),
                   eval=EvalConfig(n_points=2, first=10, n_samples=4, sampler_steps=4))


PRESETS = {"2x2": _p_2x2, "2x2_small": _p_2x2_small, "2x2x2": _p_2x2x2, "vec2x2": _p_vec2x2, "vec2x2x2": _p_vec2x2x2,
           "tiny": _p_tiny, "vec_tiny": _p_vec_tiny, "celeba": _p_celeba, "celeba_tiny": _p_celeba_tiny}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: allowed {', '.join(PRESETS)}")
    return PRESETS[name]()


def resolve(preset_name: str | None = None, config_file=None, sets=()) -> Config:
    """The CLI's config: a preset (default '2x2'), then a file, then ``--set`` overrides."""
    cfg = preset(preset_name or "2x2") if (preset_name or not config_file) else None
    if config_file:
        cfg = load(config_file, cfg)
    return override(cfg, sets)


def eval_steps(cfg: Config) -> list[int]:
    """Evaluation steps: ``eval.steps`` if given, else n_points evenly spaced in sqrt(step)
    from ``eval.first`` to ``train.steps``, truncated to integers as the reference does, the last
    one set to ``train.steps``, deduplicated, increasing."""
    if cfg.eval.steps:
        return list(cfg.eval.steps)
    import numpy as np

    n, b = cfg.eval.n_points, cfg.train.steps
    a = min(cfg.eval.first, b)
    if n == 1:
        return [b]
    pts = (np.linspace(np.sqrt(a), np.sqrt(b), n) ** 2).astype(int)
    pts[-1] = b
    return sorted(set(int(p) for p in pts if p >= 1))
