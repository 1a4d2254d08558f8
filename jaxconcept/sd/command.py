"""``jaxconcept sd``: overprompt a concept in Stable Diffusion 1.x read from a local folder.

    jaxconcept sd WEIGHTS_DIR --prompt "a triangular credit card" --concept triangular \\
        --ref rectangular --strengths 0,1,2,3 --n 4 --out runs/sd

writes OUT/grid.png (rows: strengths; columns: seeds), OUT/images.npz (uint8 images [S, N, H, W,
3], strengths, seeds) and OUT/settings.json (every setting, the model's sizes, seconds taken).
Every strength of one seed starts from the same noise. The image size defaults to the model's
own (``default_size``). Bad inputs raise ``SDError`` (the CLI prints it in one line, exit code 2)
before any weights are read; running out of accelerator memory is one too, naming the size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

from jaxconcept.sd import SDError

METHODS = ("extrapolate", "weight", "token", "repeat", "steer")  # overprompt.METHODS, without importing jax


def add_arguments(p) -> None:
    """The ``sd`` subcommand's arguments on parser ``p``."""
    p.add_argument("weights_dir", help="local SD-1.x folder in the diffusers layout (text_encoder/, unet/, vae/, "
                                       "tokenizer/); nothing is downloaded")
    p.add_argument("--prompt", required=True)
    p.add_argument("--concept", required=True, help="the word of the prompt to push")
    p.add_argument("--ref", default=None, help="reference word of the concept's token count (extrapolate, steer)")
    p.add_argument("--method", default=None, choices=METHODS,
                   help="how to overprompt (default: extrapolate with --ref, else weight)")
    p.add_argument("--strengths", default="0,1,2,3", help="comma-separated strengths s; 0 is naive prompting")
    p.add_argument("--n", type=int, default=4, help="images per strength (seeds seed .. seed+n-1)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance weight w")
    p.add_argument("--size", type=int, default=None,
                   help="image height and width in pixels (default the model's: its UNet's sample_size times the "
                        "VAE's upsampling, 512 for SD-1.x)")
    p.add_argument("--variant", default="fp32", choices=("fp32", "fp16"),
                   help="which weight files to read: full precision (*.safetensors, default) or the fp16 variant "
                        "(*.fp16.safetensors); computation is float32 (or --dtype) either way")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--point", default=None, help="steer: text-encoder tap point (default the middle layer's output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output directory")


def _strengths(text: str) -> list[float]:
    try:
        s = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        s = []
    if not s or not all(math.isfinite(x) for x in s):
        raise SDError(f"--strengths {text!r}: allowed comma-separated finite numbers, e.g. 0,1,2,3")
    return s


def check_args(a) -> list[float]:
    """Range checks of the numeric settings; returns the strengths. Raises SDError."""
    if not 1 <= a.n <= 64:
        raise SDError(f"--n={a.n}: allowed 1..64")
    if not 1 <= a.steps <= 1000:
        raise SDError(f"--steps={a.steps}: allowed 1..1000")
    if not math.isfinite(a.guidance):
        raise SDError(f"--guidance={a.guidance}: allowed a finite number")
    if not 0 <= a.seed < 2 ** 31 - a.n:
        raise SDError(f"--seed={a.seed}: allowed 0 <= seed < 2^31 - n")
    if a.size is not None and a.size <= 0:
        raise SDError(f"--size={a.size}: allowed a positive multiple of the model's latent factor (8 for SD-1.x)")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise SDError(f"--out {a.out}: is a file; give a directory")
    return _strengths(a.strengths)


def default_size(cfg) -> int:
    """The image side the model was trained at: the UNet's ``sample_size`` (latent pixels) times the
    VAE's upsampling 2**(levels - 1) (SD-1.x: 64 x 8 = 512). SDError for a non-square sample_size."""
    side = cfg.unet.sample_size
    if isinstance(side, (tuple, list)):
        if len(set(side)) != 1:
            raise SDError(f"the UNet's sample_size={list(side)} is not square: give --size")
        side = side[0]
    return int(side) * 2 ** (len(cfg.vae.block_out_channels) - 1)


def _out_of_memory(exc: Exception) -> bool:
    """Whether ``exc`` is XLA's out-of-memory error (status RESOURCE_EXHAUSTED)."""
    import jax

    return isinstance(exc, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(exc)


def latent_size(cfg, size: int) -> int:
    """Latent side of a ``size``-pixel image; SDError unless the networks' strides divide it."""
    vae, unet = 2 ** (len(cfg.vae.block_out_channels) - 1), 2 ** (len(cfg.unet.block_out_channels) - 1)
    if size % (vae * unet):
        raise SDError(f"--size={size}: allowed a multiple of {vae * unet} for this model (VAE x{vae}, UNet /{unet})")
    return size // vae


def grid_image(images, strengths, seeds):
    """A PIL image: images [S, N, H, W, 3] uint8 tiled, one row per strength, labelled."""
    from PIL import Image, ImageDraw

    s_n, n, h, w, _ = images.shape
    left, top, gap = 56, 16, 2
    grid = Image.new("RGB", (left + n * (w + gap), top + s_n * (h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for j, seed in enumerate(seeds):
        draw.text((left + j * (w + gap) + 2, 2), f"seed {seed}", fill="black")
    for i, s in enumerate(strengths):
        draw.text((2, top + i * (h + gap) + h // 2 - 6), f"s={s:g}", fill="black")
        for j in range(n):
            grid.paste(Image.fromarray(images[i, j]), (left + j * (w + gap), top + i * (h + gap)))
    return grid


def _write(path: Path, write) -> None:
    """``write(file)`` to a temporary file, then renamed onto ``path``: whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(a) -> int:
    """The command: check everything, read the weights, sample, write; returns 0."""
    strengths = check_args(a)
    from jaxconcept.sd import weights

    weights.require_extra()
    folder = weights.check_folder(a.weights_dir)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from jaxconcept.sd import configs, overprompt, pipeline
    from jaxconcept.sd.tokenizer import Tokenizer

    t0 = time.perf_counter()
    cfg = configs.from_folder(folder)
    a.size = a.size or default_size(cfg)
    lat = latent_size(cfg, a.size)
    tok = Tokenizer.from_folder(folder / "tokenizer", cfg.clip.max_position_embeddings)
    method = a.method or ("extrapolate" if a.ref else "weight")
    plan = overprompt.plan(tok, a.prompt, a.concept, method, strengths, a.ref)
    model = pipeline.StableDiffusion(cfg, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype])
    if a.point and (method != "steer" or a.point not in overprompt.steer_points(model)):
        raise SDError(f"--point {a.point!r}: allowed with --method steer, one of "
                      f"{', '.join(overprompt.steer_points(model))}")
    params = weights.load_params(folder, cfg, None if a.variant == "fp32" else a.variant)
    t_load = time.perf_counter() - t0
    cond = overprompt.conditioning(model, params, plan, a.point)  # [S, T, D]
    null = overprompt.null_conditioning(model, params, tok)  # [T, D]
    seeds = list(range(a.seed, a.seed + a.n))
    rows = []
    t1 = time.perf_counter()
    with tqdm(total=a.n * a.steps, desc="jaxconcept sd", unit="step", disable=a.no_progress) as bar:
        for seed in seeds:
            try:
                noise = jax.random.normal(jax.random.PRNGKey(seed), (lat, lat, cfg.unet.in_channels))
                x = pipeline.generate(model, params, cond, null, noise, n_steps=a.steps, guidance=a.guidance,
                                      chunk=max(1, a.steps // 10), progress=bar.update)
                rows.append(np.asarray(jnp.round(x * 255)).astype(np.uint8))  # [S, H, W, 3]
            except Exception as exc:  # noqa: BLE001 - only XLA's out-of-memory is reported in one line
                if not _out_of_memory(exc):
                    raise
                raise SDError(f"out of memory on {jax.default_backend()} at --size={a.size} ({lat}x{lat} latents, "
                              f"{len(strengths)} strengths x 2 with guidance, --dtype {a.dtype}); the model's own "
                              f"size is {default_size(cfg)}: try a smaller --size") from None
    t_sample = time.perf_counter() - t1
    images = np.stack(rows, axis=1)  # [S, N, H, W, 3]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "grid.png", lambda f: grid_image(images, strengths, seeds).save(f, format="PNG"))
    _write(out / "images.npz", lambda f: np.savez(f, images=images, strengths=np.asarray(strengths, np.float32),
                                                  seeds=np.asarray(seeds), prompt=a.prompt, method=method))
    settings = {k: v for k, v in vars(a).items() if k not in ("fn", "command")}
    settings.update(method=method, strengths=strengths, seeds=seeds, latent_size=lat,
                    model=dataclasses.asdict(cfg),
                    point=(a.point or overprompt.default_point(model)) if method == "steer" else None,
                    seconds={"load": round(t_load, 3), "sample_and_decode": round(t_sample, 3)},
                    jax=jax.__version__, backend=jax.default_backend())
    _write(out / "settings.json", lambda f: f.write((json.dumps(settings, indent=1) + "\n").encode()))
    print(f"jaxconcept sd: {method} on {a.concept!r}, {len(strengths)} strengths x {a.n} seeds, {a.steps} steps, "
          f"{a.size} px in {t_sample:.1f} s -> {out}/grid.png, images.npz, settings.json")
    return 0
