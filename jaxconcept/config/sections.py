"""The config sections, the whole ``Config`` with its sweep axes, and member expansion.

Each field declares what it allows (``checks``); the rules that tie fields together are in
``rules.validate``. The data section is one class per data kind (``ImageData``, ``VectorData``,
``CelebaData``) on a shared base (``DataConfig``).

A sweep is held apart from the fields: ``Config.sweep`` (grid axes, ``(field, values)`` pairs),
``Config.zipped`` and ``Config.sampled`` (``sweeps``), and ``members(cfg)`` expands them into one
config per member with every field scalar and one seed. A swept field holds member 0's value, so
``cfg.data`` is always member 0's data; an axis of one value is just that value.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from jaxconcept.config.checks import (ConfigError, Distinct, Fraction, Increasing, NonNeg, NonNegInt, PosInt, Positive,
                                      Real, field_names, invalid, rule, section, untuple)
from jaxconcept.config import sweeps
from jaxconcept.config.rules import MAX_CLASSES, validate
from jaxconcept.config.sweeps import SWEEP_FIELDS

IMAGE_CONCEPTS = ("shape", "colour", "size", "background")  # compositional ones, docs/study.md A1 order
SEED_BOUND = 2 ** 31
SWEEP_AXES = SWEEP_FIELDS + ("seeds",)  # the axes every earlier version allowed: data-generating parameters, seeds

Concepts = Annotated[tuple[Literal[IMAGE_CONCEPTS], ...], Field(min_length=1),
                     rule(lambda v: list(v) == sorted(set(v), key=IMAGE_CONCEPTS.index),
                          "distinct, in the order " + ", ".join(IMAGE_CONCEPTS))]
ImageSize = Annotated[int, Field(ge=8, le=512)]
Vec = tuple[Positive, ...]


# --------------------------------------------------------------------------------------------
# Data: one class per kind
# --------------------------------------------------------------------------------------------
@section("data")
class DataConfig:
    """The fields every data kind shares; a config holds one of its subclasses, chosen by ``kind``."""

    held_out: tuple[NonNegInt, ...] = (3,)  # held-out class indices (row-major over the concepts); vectors: () = default
    masked: tuple[str, ...] = ()  # concepts whose conditioning entries are zeroed (underspecification)
    # fraction of training examples whose ``masked`` concepts are zeroed (the underspecification dose); at 1 the
    # prompts are masked too, below 1 prompts and test examples keep every concept
    mask_prob: Annotated[Real, Field(ge=0, le=1)] = 1.0
    n_per_class: Annotated[int, Field(ge=2)] = 2048  # training examples per training class
    val_frac: Fraction = 0.15
    n_test: PosInt = 32  # test examples per held-out class, for the held-out loss at evaluation

    # The fields that do not change what the concept probe learns from and is tested on (which
    # classes are trained, how they are conditioned, split sizes, where files are kept): every
    # other field, a field added later included, is in the probe's cache key (``probe.cache_key``).
    probe_ignores: ClassVar[frozenset] = frozenset({"held_out", "masked", "mask_prob", "n_per_class", "val_frac",
                                                    "n_test"})


@section("data")
class ImageData(DataConfig):
    """Generated images of coloured shapes (docs/study.md A1)."""

    kind: Literal["images"] = "images"
    concepts: Concepts = ("colour", "size")  # compositional concepts, a subset of IMAGE_CONCEPTS
    values: tuple[Annotated[int, Field(ge=2)], ...] = (2, 2)  # number of values per compositional concept
    sep_col: Annotated[Real, Field(gt=0, le=0.8)] = 0.2
    sep_size: Annotated[Real, Field(gt=0, le=0.4)] = 0.4
    image_size: ImageSize = 32
    blur_sigma: NonNeg = 1.0  # pixels
    pixel_noise: NonNeg = 0.001


@section("data")
class VectorData(DataConfig):
    """Gaussian clusters on a grid of concept values, plus nuisance dimensions (docs/study.md A6)."""

    kind: Literal["vector"] = "vector"
    dim: Annotated[int, Field(ge=2)] = 2  # concept dimensions
    perdim: Annotated[int, Field(ge=2)] = 2  # values per concept dimension
    m: Vec = (1.0, 1.0)  # per-dimension separation of neighbouring class means
    s: Vec = (0.05, 0.05)  # per-dimension spread (std)
    normalize: bool = True  # divide by the grid's extent so every concept spans a unit range
    dim_nuisance: Annotated[int, Field(ge=0, le=4096)] = 1
    nuisance: Literal["gaussian", "bimodal"] = "gaussian"
    cond_mode: Literal["classy", "mean", "observed"] = "classy"
    cond_noise: NonNeg = 0.0  # std of the noise added to "observed" conditioning
    train_classes: Annotated[tuple[NonNegInt, ...], Distinct] = ()  # () = at most one non-zero index

    probe_ignores: ClassVar[frozenset] = DataConfig.probe_ignores | {"cond_mode", "cond_noise", "train_classes"}


@section("data")
class CelebaData(DataConfig):
    """Attribute-labelled photographs (docs/study.md A5; jaxconcept/data/celeba.py)."""

    kind: Literal["celeba"] = "celeba"
    # binary attributes, each a two-valued concept (0 absent, 1 present); at most MAX_CLASSES combinations
    attributes: Annotated[tuple[Annotated[str, Field(min_length=1)], ...],
                          Field(min_length=1, max_length=MAX_CLASSES.bit_length() - 1), Distinct] = ("Male", "Smiling")
    source: str = "celeb_a"  # a TFDS dataset name, prepared in the array_record format (data/celeba_source.py)
    data_dir: str = ""  # TFDS data directory ("" = $TFDS_DATA_DIR, else ~/tensorflow_datasets)
    # the preprocessed-image cache ("" = $JAXCONCEPT_DATA_CACHE, else ~/.cache/jaxconcept/data); not the data
    cache_dir: str = ""
    image_size: ImageSize = 32
    crop: NonNegInt = 0  # centre-crop side in source pixels before resizing (0 = the largest centred square)
    augment: bool = True  # random horizontal flips and colour jitter on training batches, on device
    jitter: Annotated[Real, Field(ge=0, le=0.5)] = 0.1  # colour-jitter strength: brightness, contrast, saturation, hue

    # the probe learns from the evaluation split, which the held-out classes and split sizes select;
    # augment and jitter only change how it is trained (any cached probe met its bar on the same test images)
    probe_ignores: ClassVar[frozenset] = frozenset({"masked", "mask_prob", "augment", "jitter", "cache_dir"})


DATA_KINDS = {"images": ImageData, "vector": VectorData, "celeba": CelebaData}
AnyData = ImageData | VectorData | CelebaData


def data_config(kind: str, **fields) -> DataConfig:
    """The data section of ``kind`` ("images", "vector" or "celeba") with ``fields`` set."""
    if not isinstance(kind, str) or kind not in DATA_KINDS:
        raise invalid("data.kind", kind, "one of " + ", ".join(DATA_KINDS))
    return DATA_KINDS[kind](**fields)


def not_for_kind(key: str, kind: str) -> ConfigError:
    """The error for a data field (or sweep axis) that another data kind has."""
    return ConfigError(f"{key} does not apply to data.kind={kind!r}: its fields are "
                       + ", ".join(sorted(field_names(DATA_KINDS[kind]))))


# --------------------------------------------------------------------------------------------
# Model, training, evaluation
# --------------------------------------------------------------------------------------------
@section("model")
class ModelConfig:
    """Score network and diffusion process (docs/study.md A2, A6)."""

    arch: Literal["unet", "mlp"] = "unet"
    ch: PosInt = 64
    ch_mult: Annotated[tuple[PosInt, ...], Field(min_length=1)] = (1, 2, 4)
    num_res_blocks: PosInt = 2
    num_heads: PosInt = 4
    norm_groups: PosInt = 8
    dropout: Fraction = 0.1
    mid_attention: bool = True
    hidden: Annotated[tuple[PosInt, ...], Field(min_length=1)] = (1024,)  # mlp widths
    time_embed_dim: Annotated[int, Field(ge=2, multiple_of=2)] = 64
    embed_dim: PosInt = 256
    conditioning: Literal["sep_mlp", "common_linear", "common_zerolinear"] = "sep_mlp"
    gamma_min: Real = -5.0
    gamma_max: Real = 10.0  # w initialised to gamma_max - gamma_min = 15 (docs/study.md A2)
    data_noise: Positive = 0.001  # std of the reconstruction likelihood
    init_scale: Positive = 1.0  # multiplies every initial weight (ablation)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    conv: Literal["auto", "xla", "explicit"] = "auto"  # "explicit": canonical convs and matmuls; "auto": explicit on CPU


@section("train")
class TrainConfig:
    steps: Annotated[int, Field(ge=1, lt=SEED_BOUND)] = 20000
    batch_size: Annotated[int, Field(ge=2, multiple_of=2)] = 64  # even: antithetic time sampling
    lr: Positive = 1e-3
    weight_decay: NonNeg = 0.01
    grad_clip: Positive = 0.01
    warmup: NonNegInt = 0  # linear learning-rate warmup: step i (from 0) uses lr * min(1, (i + 1) / warmup); 0 = none
    ema: Fraction = 0.0  # decay of an exponential moving average of the parameters, used for evaluation (0 = off)
    p_cfg: Fraction = 0.0  # probability of dropping the conditioning (classifier-free guidance)
    steps_per_call: PosInt = 100  # at most K steps per call of the compiled training program (a loop on device)
    # "epochs": shuffled epochs without replacement, short last batch (the reference); "replacement"
    batches: Literal["epochs", "replacement"] = "epochs"
    # steps between train-state checkpoints (and one at the last step); evaluation points save samples
    # and parameters, not checkpoints
    checkpoint_every: PosInt = 1000
    keep_checkpoints: PosInt = 3
    strategy: Literal["auto", "vmap", "map", "unroll"] = "auto"  # how members are stacked ("map": chunks)
    map_batch_size: PosInt = 1  # members per chunk for strategy "map"
    memory_budget: NonNeg = 0.0  # bytes of device memory "auto" may plan for (0 = the device's free memory)
    # also write metrics.jsonl's scalars to RUN_DIR/tensorboard (tensorboardX: the "tensorboard" extra)
    tensorboard: bool = False


@section("eval")
class EvalConfig:
    n_points: PosInt = 60  # evaluation checkpoints, evenly spaced in sqrt(step)
    first: PosInt = 500  # the reference's first evaluation step (evaluation starts at min(first, train.steps))
    steps: Annotated[tuple[NonNegInt, ...], Increasing] = ()  # explicit evaluation steps; override n_points/first
    n_samples: PosInt = 32  # generated per class (held-out included)
    sampler_steps: PosInt = 50
    w_cfg: NonNeg = 1.0  # guidance eps(null) + w (eps(cond) - eps(null)) as the reference; 1 = plain conditional
    sampler_output: Literal["z0", "mean"] = "z0"  # "z0" as the reference returns; "mean" = z0 / alpha0
    prompts: Literal["random", "mean"] = "random"  # training classes' prompts: random inside each class's box | mean
    val_batches: NonNegInt = 0  # 0 = the loss on the whole validation set (the reference); k = k random batches
    vector_band: NonNeg = 0.0  # vectors: also require |x - value| <= k std to count as correct (0 = nearest only)
    save_params: bool = True  # keep parameters at every evaluation point (needed by `elicit`)
    # samples/step_*.npz: "float32" as computed, or "float16" (refused per step when rounding could change a
    # classification)
    sample_dtype: Literal["float32", "float16"] = "float32"


# --------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------
@section("")
class Config:
    """One run, or a sweep of runs: the sections, member 0's seed, and the sweep axes (``sweeps``).

    ``sweep`` holds grid axes, ``(field, values)`` pairs, e.g. ``(("data.sep_col", (0.2, 0.4)),
    ("seeds", (0, 100)))``; ``zipped`` names grid axes taken together, e.g. ``(("model.gamma_min",
    "model.gamma_max"),)``; ``sampled`` holds ``(field, law, args)`` triples, e.g. ``(("train.lr",
    "log_uniform", (1e-4, 1e-2)),)``, drawn ``draws`` times with seed ``draw_seed``. Axes are put in
    member order, an axis of one value becomes that value, and each swept field (and ``seed``) is
    set to member 0's value, so to change one, change its axis.
    """

    data: AnyData = Field(default_factory=ImageData)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: Annotated[int, Field(ge=0, lt=SEED_BOUND)] = 0
    name: str = ""
    sweep: tuple[tuple[str, tuple], ...] = ()
    zipped: tuple[tuple[str, ...], ...] = ()
    sampled: tuple[tuple[str, str, tuple], ...] = ()
    draws: NonNegInt = 0  # sweep.n in files: how many times the sampled fields are drawn
    draw_seed: Annotated[int, Field(ge=0, lt=SEED_BOUND)] = 0  # sweep.seed in files

    def __post_init__(self):
        for k, v in sweeps.normalized(self).items():
            object.__setattr__(self, k, v)
        validate(self)
        sweeps.check_points(self)

    @property
    def seeds(self) -> tuple:
        """The seeds of the sweep's members (one for a single run or a member)."""
        return dict(self.sweep).get("seeds", (self.seed,))


def members(cfg: Config) -> list[Config]:
    """Expand a sweep into one config per member: the product of its axes in member order (each
    axis at its first field's place in field order, e.g. data.sep_col, data.sep_size, data.m,
    data.s, ..., model, train, eval fields; seeds innermost; ``config.sweeps``). Each member has no axes
    and one seed."""
    return sweeps.members(cfg)


def sweep_values(cfg: Config, key: str) -> list:
    """The values a grid axis field (or "seeds") takes: its axis, else ``[value]``; ``[]`` for a
    data field the config's data kind does not have."""
    axes = dict(cfg.sweep)
    if key in axes:
        return list(axes[key])
    if key == "seeds":
        return [cfg.seed]
    sec, field = key.split(".", 1)
    return [getattr(getattr(cfg, sec), field)] if hasattr(getattr(cfg, sec), field) else []


def swept_fields(cfg: Config) -> list[str]:
    """The fields that take more than one value, in member order ('seed' for the seeds)."""
    return [("seed" if a == "seeds" else a) for a in sweeps.swept(cfg)]


def sweep_settings(member: Config) -> dict:
    """A member's seed and data sweep fields as JSON values, keyed "seed", "sep_col", "sep_size", "m",
    "s", "attributes", "cond_noise", "mask_prob" (as in members.json); None for a field its data kind
    does not have."""
    return {"seed": member.seed, **{k[5:]: untuple(getattr(member.data, k[5:], None)) for k in SWEEP_FIELDS}}


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
    return sorted({int(p) for p in pts if p >= 1})

