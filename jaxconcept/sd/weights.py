"""Stable Diffusion 1.x weights from a local diffusers-layout folder into our parameter tree.

    FOLDER/text_encoder/{config.json, model[.fp16].safetensors}
    FOLDER/unet/{config.json, diffusion_pytorch_model[.fp16].safetensors}
    FOLDER/vae/{config.json, diffusion_pytorch_model[.fp16].safetensors}
    FOLDER/tokenizer/{vocab.json, merges.txt[, special_tokens_map.json]}

Nothing is downloaded. Full-precision files are read when present, else the ``.fp16`` variant;
every tensor becomes float32. Read with ``safetensors`` (numpy; the ``jaxconcept[sd]`` extra).

The name mapping is one rule: our modules are named as diffusers/transformers name theirs,
with each numeric index joined to the name before it, so the tensor ``a.b.0.c.weight`` is our
parameter ``a/b_0/c/<leaf>``. The leaf and the layout follow from the module it lands in:

    PyTorch                          ours                      layout
    Conv2d.weight [out, in, kh, kw]  Conv.kernel               [kh, kw, in, out]
    Linear.weight [out, in]          Dense.kernel              [in, out] (a 1x1 conv's squeezed)
    {Group,Layer}Norm.weight         *Norm.scale               as is
    Embedding.weight                 Embed.embedding           as is
    *.bias                           *.bias                    as is

Besides the rule: the text encoder's ``text_model.`` prefix is dropped (transformers < 5 wrote
it), the VAE's encoder (``encoder.*``, ``quant_conv.*``) is not read (sampling only decodes), and
old VAE attention names are renamed (``query``/``key``/``value``/``proj_attn`` -> ``to_q``/
``to_k``/``to_v``/``to_out.0``). Every parameter must be filled exactly once and every tensor
read must be used, with the shape the configs imply; anything else is an ``SDError``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept.sd import SDError
from jaxconcept.sd import configs as C
from jaxconcept.sd.pipeline import StableDiffusion, example_inputs

COMPONENTS = ("text_encoder", "unet", "vae")
LAYOUT = "a diffusers-layout folder (text_encoder/, unet/, vae/, tokenizer/, each with its files)"
_SKIP = {"text_encoder": ("embeddings.position_ids",), "vae": ("encoder.", "quant_conv.")}
_RENAME = {"vae": {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}}


def require_extra():
    """The ``safetensors`` and ``tokenizers`` modules; SDError when the extra is not installed."""
    try:
        import safetensors.numpy  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as exc:
        raise SDError(f"reading Stable Diffusion weights needs the optional extra: pip install 'jaxconcept[sd]' "
                      f"(safetensors, tokenizers; {exc.name or exc} is missing)") from None


def check_folder(folder) -> Path:
    """The folder as a Path once it exists and has the four component folders; else SDError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SDError(f"{folder}: {'not a directory' if folder.exists() else 'does not exist'}; give {LAYOUT}")
    missing = [c for c in (*COMPONENTS, "tokenizer") if not (folder / c).is_dir()]
    if missing:
        raise SDError(f"{folder}: no {', '.join(m + '/' for m in missing)}; expected {LAYOUT}")
    return folder


def safetensors_files(path: Path, variant: str | None = None) -> list[Path]:
    """The weight files of one component: full precision, else ``*.fp16.safetensors``
    (``variant="fp16"``: only those). Raises SDError when there are none."""
    fp16 = sorted(path.glob("*.fp16.safetensors"))
    full = sorted(set(path.glob("*.safetensors")) - set(fp16))
    files = fp16 if variant == "fp16" else (full or fp16)
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: PyTorch pickles are not read; save with safe_serialization=True)" \
            if bins else ""
        raise SDError(f"{path}: no *.safetensors weights{hint}")
    return files


def read_tensors(files) -> dict:
    """{name: float32 numpy array} of every tensor in ``files`` (one model, maybe sharded)."""
    from safetensors.numpy import load_file

    out = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which
            raise SDError(f"{f}: cannot be read as safetensors ({type(exc).__name__}: {exc})") from None
        out.update({k: np.asarray(v, np.float32) for k, v in tensors.items()})
    return out


def our_path(component: str, name: str) -> tuple | None:
    """Where tensor ``name`` of ``component`` goes: (module path..., "weight" or "bias"), or None
    for a tensor sampling does not use. E.g. ``down_blocks.0.attentions.1.proj_in.weight`` ->
    ("down_blocks_0", "attentions_1", "proj_in", "weight")."""
    if component == "text_encoder" and name.startswith("text_model."):
        name = name[len("text_model."):]
    if any(name.startswith(p) for p in _SKIP.get(component, ())):
        return None
    parts = []
    for p in name.split("."):
        p = _RENAME.get(component, {}).get(p, p)
        for q in p.split("."):
            if q.isdigit() and parts:
                parts[-1] = f"{parts[-1]}_{q}"
            else:
                parts.append(q)
    return tuple(parts)


def _convert(array: np.ndarray, leaf: str, shape: tuple) -> np.ndarray:
    """A PyTorch weight in our layout for a parameter ``leaf`` of ``shape`` (the table above)."""
    if leaf == "kernel" and array.ndim == 4 and len(shape) == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and len(shape) == 2:
        return array.reshape(array.shape[:2]).T  # a Linear, or a 1x1 conv stored for a Linear
    return array


def to_tree(component: str, tensors: dict, template: dict, where: str) -> dict:
    """Our parameter tree for ``template`` (shapes: ``jax.eval_shape`` of init) from PyTorch
    ``tensors``; SDError for a tensor without a place, a parameter without a tensor, or a shape
    that does not match the config."""
    out, used = {}, set()
    for name, array in tensors.items():
        path = our_path(component, name)
        if path is None:
            continue
        *mods, kind = path
        node = template
        for m in mods:
            node = node.get(m) if isinstance(node, dict) else None
            if node is None:
                raise SDError(f"{where}: tensor {name} has no place in the model its config.json describes")
        leaf = "bias" if kind == "bias" else next((k for k in ("kernel", "scale", "embedding") if k in node), None)
        if leaf is None or leaf not in node or kind not in ("weight", "bias"):
            raise SDError(f"{where}: tensor {name} has no place in the model its config.json describes")
        value = _convert(array, leaf, node[leaf].shape)
        if value.shape != tuple(node[leaf].shape):
            raise SDError(f"{where}: tensor {name} has shape {array.shape}; its config.json implies "
                          f"{tuple(node[leaf].shape)}")
        dest = out
        for m in mods:
            dest = dest.setdefault(m, {})
        dest[leaf] = value
        used.add((*mods, leaf))
    wanted = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]}
    missing = sorted(wanted - used)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SDError(f"{where}: no tensor for {', '.join('.'.join(m) for m in missing[:3])}{more}")
    return out


@functools.lru_cache(maxsize=8)
def template(cfg: C.SDConfig) -> dict:
    """Our parameter tree's shapes for ``cfg`` (``jax.eval_shape`` of init: nothing computed)."""
    return jax.eval_shape(lambda: StableDiffusion(cfg).init(jax.random.PRNGKey(0), *example_inputs(cfg))["params"])


def load_params(folder, cfg: C.SDConfig, variant: str | None = None) -> dict:
    """Our float32 parameters {"text_encoder", "unet", "vae"} from the folder's safetensors."""
    params = {}
    for comp in COMPONENTS:
        files = safetensors_files(Path(folder) / comp, variant)
        params[comp] = to_tree(comp, read_tensors(files), template(cfg)[comp], f"{Path(folder) / comp}")
    return jax.tree.map(jnp.asarray, params)


def load(folder, dtype=jnp.float32, variant: str | None = None):
    """A Stable Diffusion 1.x folder (diffusers layout) read into our model.

    Args:
      folder: the local folder (see the module docstring); nothing is downloaded.
      dtype: compute dtype (parameters stay float32).
      variant: None (full precision if present, else fp16) or "fp16".
    Returns:
      (model: ``StableDiffusion``, params, tokenizer: ``tokenizer.Tokenizer``).
    Raises:
      SDError: the extra is not installed, the folder or a file is missing or unreadable, a
        config asks for something other than SD-1.x, or the weights do not fit the configs.
    """
    from jaxconcept.sd.tokenizer import Tokenizer

    require_extra()
    folder = check_folder(folder)
    cfg = C.from_folder(folder)
    tok = Tokenizer.from_folder(folder / "tokenizer", cfg.clip.max_position_embeddings)
    return StableDiffusion(cfg, dtype), load_params(folder, cfg, variant), tok
