"""Presets: the paper's configs as small functions, and tiny variants for tests."""
from __future__ import annotations

from dataclasses import replace

from jaxconcept.config.checks import ConfigError
from jaxconcept.config.sections import CelebaData, Config, EvalConfig, ImageData, ModelConfig, TrainConfig, VectorData


def _p_2x2():
    """docs/study.md A1/A2: colour x size, sep_col 0.2, sep_size 0.4, class 3 (blue-small) held out."""
    return Config(name="2x2")


def _p_2x2x2():
    """Colour x size x background; the held-out class is blue-small on the dark background."""
    return Config(name="2x2x2", data=ImageData(concepts=("colour", "size", "background"), values=(2, 2, 2),
                                               held_out=(7,)))


def _p_2x2_small():
    """The 2x2 data at 16x16 with a small U-Net (widths 16/32, one ResNet block per level), batch 64:
    a CPU-sized image run, and the small config of benchmarks/train_bench.py."""
    c = _p_2x2()
    return replace(c, name="2x2_small", data=replace(c.data, image_size=16),
                   model=replace(c.model, ch=16, ch_mult=(1, 2), num_res_blocks=1))


def _p_vec2x2():
    """docs/study.md A6: 2 concept dimensions, 2 values each, one nuisance dimension, MLP score network."""
    return Config(
        name="vec2x2",
        data=VectorData(dim=2, perdim=2, m=(1.0, 1.0), s=(0.05, 0.05), held_out=(), n_per_class=1024),
        model=ModelConfig(arch="mlp", gamma_max=10.0, dropout=0.0),
        train=TrainConfig(batch_size=32, steps=20000),
        eval=EvalConfig(n_samples=128),
    )


def _p_vec2x2x2():
    c = _p_vec2x2()
    return replace(c, name="vec2x2x2", data=replace(c.data, dim=3, m=(1.0, 1.0, 1.0), s=(0.05, 0.05, 0.05)))


def _tiny_unet() -> ModelConfig:
    return ModelConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_heads=2, norm_groups=4, time_embed_dim=16,
                       embed_dim=32)


def _p_tiny():
    """A few-second image config for tests: 16x16, a small U-Net, few images and steps."""
    return Config(
        name="tiny",
        data=ImageData(image_size=16, n_per_class=32),
        model=_tiny_unet(),
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
    """docs/study.md A5, the reference's CelebA runs: Male x Smiling with smiling women (0, 1) held out, 64x64
    faces, U-Net 64/128/256 (2 ResNet blocks, mid attention, GroupNorm of 4 groups), AdamW lr 1e-3
    and weight decay 1e-5, batch 64, 2 M steps, 60 evaluation points spaced in sqrt(step), 30,000
    images per training combination (5 % of them kept back for the validation loss)."""
    return Config(
        name="celeba",
        data=CelebaData(attributes=("Male", "Smiling"), held_out=(1,), source="celeb_a", image_size=64,
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
                   model=_tiny_unet(),
                   train=replace(c.train, steps=20, batch_size=8, steps_per_call=5, checkpoint_every=10),
                   eval=EvalConfig(n_points=2, first=10, n_samples=4, sampler_steps=4))


PRESETS = {"2x2": _p_2x2, "2x2_small": _p_2x2_small, "2x2x2": _p_2x2x2, "vec2x2": _p_vec2x2, "vec2x2x2": _p_vec2x2x2,
           "tiny": _p_tiny, "vec_tiny": _p_vec_tiny, "celeba": _p_celeba, "celeba_tiny": _p_celeba_tiny}


def preset(name: str) -> Config:
    """The preset ``name`` (one of ``PRESETS``)."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: allowed {', '.join(PRESETS)}")
    return PRESETS[name]()
