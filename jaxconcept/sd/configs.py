"""The sizes of SD-1.x's three networks, read from each component's ``config.json``.

The defaults are Stable Diffusion 1.4's (CompVis/stable-diffusion-v1-4: ``text_encoder`` is
CLIP ViT-L/14's text tower, ``unet`` and ``vae`` as in its diffusers configs), so ``SDConfig()``
is the full-size model. ``from_folder`` reads a diffusers-layout folder; a key whose value asks
for something this port does not implement (SD-2.x's linear projections, SDXL's extra
embeddings...) is refused with ``SDError`` naming the file, the key and what is supported.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from jaxconcept.sd import SDError


@dataclass(frozen=True)
class CLIPConfig:
    """transformers' ``CLIPTextConfig`` fields used by the text encoder."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class UNetConfig:
    """diffusers' ``UNet2DConditionModel`` fields of the SD-1.x layout; ``heads`` is one count per
    block (the config's ``num_attention_heads``, or its misnamed ``attention_head_dim``)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    cross_attention_dim: int = 768
    heads: tuple = (8, 8, 8, 8)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int = 1
    sample_size: int = 64  # the latent side it was trained at (SD-1.x: 64, images 8x that: 512 px)


@dataclass(frozen=True)
class VAEConfig:
    """diffusers' ``AutoencoderKL`` fields the decoder needs."""

    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215


@dataclass(frozen=True)
class SDConfig:
    clip: CLIPConfig = CLIPConfig()
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()


# Keys whose value must be the SD-1.x one (absent counts as that value): other values ask for
# a network this port does not build.
_FIXED = {
    "unet": {"act_fn": "silu", "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
             "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
             "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "use_linear_projection": False,
             "only_cross_attention": False, "dual_cross_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
             "mid_block_scale_factor": 1, "timestep_post_act": None, "attention_type": "default",
             "resnet_out_scale_factor": 1.0, "num_class_embeds": None, "projection_class_embeddings_input_dim": None,
             "downsample_padding": 1},
    "vae": {"act_fn": "silu", "mid_block_add_attention": True, "use_post_quant_conv": True, "shift_factor": None},
    "text_encoder": {"hidden_act": ("quick_gelu", "gelu")},
}
_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}


def _fields(cls, raw: dict, rename: dict | None = None) -> dict:
    """The dataclass's fields present in ``raw`` (lists as tuples), keys renamed raw -> field."""
    rename = rename or {}
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        key = rename.get(key, key)
        if key in names:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _check(component: str, raw: dict, where: str) -> None:
    for key, want in _FIXED[component].items():
        value = raw.get(key, want if not isinstance(want, tuple) else want[0])
        allowed = want if isinstance(want, tuple) else (want,)
        if value not in allowed:
            raise SDError(f"{where}: {key}={value!r} is not supported (SD-1.x: {' or '.join(map(repr, allowed))})")


def parse(component: str, raw: dict, where: str = "config.json"):
    """The config of ``component`` ("text_encoder", "unet" or "vae") from its config.json dict.

    Raises:
      SDError: a value this port does not implement, or inconsistent block lists.
    """
    if not isinstance(raw, dict):
        raise SDError(f"{where}: not a JSON object")
    _check(component, raw, where)
    if component == "text_encoder":
        return CLIPConfig(**_fields(CLIPConfig, raw))
    if component == "vae":
        return VAEConfig(**_fields(VAEConfig, raw))
    f = _fields(UNetConfig, raw)
    n = len(f.get("block_out_channels", UNetConfig.block_out_channels))
    heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)  # diffusers' own fallback
    f["heads"] = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
    for key, allowed in _BLOCKS.items():
        types = f.get(key, getattr(UNetConfig, key))
        if len(types) != n or any(t not in allowed for t in types):
            raise SDError(f"{where}: {key}={list(types)} is not supported (SD-1.x: {n} of {', '.join(allowed)})")
    if len(f["heads"]) != n or not isinstance(f.get("transformer_layers_per_block", 1), int):
        raise SDError(f"{where}: attention heads / transformer_layers_per_block must be one per block or one int")
    return UNetConfig(**f)


def read_json(path: Path) -> dict:
    """A JSON file's contents; SDError when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SDError(f"{path} is missing (a diffusers-layout folder has text_encoder/, unet/, vae/, tokenizer/)") \
            from None
    except (OSError, ValueError) as exc:
        raise SDError(f"{path}: cannot be read as JSON ({exc})") from None


def from_folder(folder) -> SDConfig:
    """The ``SDConfig`` of a diffusers-layout folder (its three ``*/config.json``).

    Raises:
      SDError: a missing or unreadable config, or an unsupported value.
    """
    folder = Path(folder)
    parts = {c: parse(c, read_json(folder / c / "config.json"), f"{folder / c / 'config.json'}")
             for c in ("text_encoder", "unet", "vae")}
    if parts["unet"].cross_attention_dim != parts["text_encoder"].hidden_size:
        raise SDError(f"{folder / 'unet' / 'config.json'}: cross_attention_dim={parts['unet'].cross_attention_dim} is "
                      f"not the text encoder's hidden_size={parts['text_encoder'].hidden_size}")
    if parts["unet"].in_channels != parts["vae"].latent_channels:
        raise SDError(f"{folder / 'unet' / 'config.json'}: in_channels={parts['unet'].in_channels} is not the VAE's "
                      f"latent_channels={parts['vae'].latent_channels}")
    return SDConfig(clip=parts["text_encoder"], unet=parts["unet"], vae=parts["vae"])
