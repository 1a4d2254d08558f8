"""Stable Diffusion 1.x weights from a local diffusers-layout folder into our parameter tree.

    FOLDER/text_encoder/{config.json, model[.VARIANT].safetensors}
    FOLDER/unet/{config.json, diffusion_pytorch_model[.VARIANT].safetensors}
    FOLDER/vae/{config.json, diffusion_pytorch_model[.VARIANT].safetensors}
    FOLDER/tokenizer/{tokenizer.json or vocab.json + merges.txt, tokenizer_config.json, ...}

Nothing is downloaded. Each component's weights are one precision, chosen as diffusers names
its files: the files without a variant (full precision, float32) by default, or a variant
(``fp16``: ``*.fp16.safetensors``). A sharded model is read from its index
(``*.safetensors.index.json``, or ``*.safetensors.index.fp16.json`` for the variant), exactly the
shards the index names. Other variants in the folder (``.non_ema``, ``.ema``, ``.bf16``) are never
read unless asked for. A component without files of the requested precision falls back to the
other of fp32 / fp16 with a logged warning; two files or indexes that could each be the
component's weights, shards without their index, and a tensor name in two files are SDErrors.
Every tensor becomes float32. Read with ``safetensors`` (numpy; the ``jaxconcept[sd]`` extra).

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
import json
import logging
import re
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
log = logging.getLogger(__name__)


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


_SHARD = re.compile(r"-\d+-of-\d+")  # "-00001-of-00002" in a shard's name
_INDEX = (re.compile(r"^[^.]+\.safetensors\.index(?:\.(?P<v>[^.]+))?\.json$"),
          re.compile(r"^[^.]+\.(?P<v>[^.]+)\.safetensors\.index\.json$"))  # the second: a published misnaming


def _variant(name: str) -> tuple:
    """(variant or None, is a shard) of a ``*.safetensors`` file name, as diffusers and
    transformers write them: ``model.safetensors`` (None), ``model.fp16.safetensors``,
    ``model.fp16-00001-of-00002.safetensors``."""
    stem = name[: -len(".safetensors")]
    plain = _SHARD.sub("", stem)
    parts = plain.split(".", 1)
    return (parts[1] if len(parts) > 1 else None), plain != stem


def _index_variant(name: str):
    """The variant an index file is for (None: full precision), or False when ``name`` is no index."""
    for pattern in _INDEX:
        m = pattern.match(name)
        if m:
            return m.group("v")
    return False


def _describe(variant) -> str:
    return "full-precision (fp32)" if variant is None else f"{variant!r}-variant"


def _read_index(index: Path) -> dict:
    """The ``weight_map`` {tensor: file name} of a safetensors index; SDError when it has none."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()):
            return weight_map
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SDError(f"{index}: not a safetensors index (JSON with a weight_map; {exc})") from None
    raise SDError(f"{index}: not a safetensors index (its weight_map is not {{tensor: file name}})")


def _files_of(path: Path, variant) -> tuple:
    """(the weight files of ``variant`` in ``path``, the index they come from or None); ([], None)
    when there are none. SDError when the choice is ambiguous or an index is broken."""
    indexes = sorted(p for p in path.glob("*.json") if _index_variant(p.name) == variant)
    named = {n for i in indexes for n in _read_index(i).values()}
    singles, shards = [], []
    for p in sorted(path.glob("*.safetensors")):
        v, shard = _variant(p.name)
        if v == variant and p.name not in named:
            (shards if shard else singles).append(p)
    what = _describe(variant)
    if len(indexes) + len(singles) > 1:
        names = ", ".join(p.name for p in indexes + singles)
        raise SDError(f"{path}: several {what} weights ({names}); which one is the model's is ambiguous: keep one")
    if indexes:
        names = sorted(set(_read_index(indexes[0]).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise SDError(f"{indexes[0]}: names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          "not in the folder")
        return [path / n for n in names], indexes[0]
    if shards:
        raise SDError(f"{path}: {what} shards ({shards[0].name}, ...) without their index "
                      "(*.safetensors.index.json): cannot tell which shards make the model")
    return singles, None


def weight_files(path, variant: str | None = None) -> tuple:
    """The weight files of one component for ``variant`` (None: full precision; "fp16"), as the
    module docstring describes.

    Returns:
      (files: [Path], index: Path or None, variant actually read).
    Raises:
      SDError: no weights of either precision, an ambiguous choice, a broken index.
    """
    path = Path(path)
    files, index = _files_of(path, variant)
    if files:
        return files, index, variant
    other = {None: "fp16", "fp16": None}.get(variant, variant)
    files, index = _files_of(path, other) if other != variant else ([], None)
    if files:
        log.warning("%s: no %s weights; reading the %s weights (%s) instead", path, _describe(variant),
                    _describe(other), (index or files[0]).name)
        return files, index, other
    found = sorted({v for v, _ in map(_variant, (p.name for p in path.glob("*.safetensors"))) if v})
    bins = sorted(p.name for p in path.glob("*.bin"))
    hint = f"; found only the variants {', '.join(found)}" if found else ""
    if bins:
        hint += f"; found {', '.join(bins)}: PyTorch pickles are not read; save with safe_serialization=True"
    raise SDError(f"{path}: no {_describe(variant)} *.safetensors weights{hint}")


def read_tensors(files, index: Path | None = None) -> dict:
    """{name: float32 numpy array} of every tensor in ``files`` (one model, maybe sharded).
    SDError for a file that cannot be read, a tensor name in two files, or (``index`` given) a
    tensor the index places elsewhere than where it is, checked before any tensor is read."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    def unreadable(f, exc):  # a damaged or foreign file: say which
        return SDError(f"{f}: cannot be read as safetensors ({type(exc).__name__}: {exc})")

    source = {}
    for f in files:
        try:
            with safe_open(str(f), "numpy") as h:
                names = list(h.keys())
        except Exception as exc:  # noqa: BLE001
            raise unreadable(f, exc) from None
        for k in names:
            if k in source:
                raise SDError(f"{f.parent}: tensor {k} is in both {source[k]} and {f.name}; a model holds each "
                              "tensor once")
            source[k] = f.name
    if index is not None:
        weight_map = _read_index(index)
        wrong = sorted(k for k in set(weight_map) | set(source) if weight_map.get(k) != source.get(k))
        if wrong:
            k = wrong[0]
            raise SDError(f"{index}: places tensor {k} in {weight_map.get(k) or 'no file'}, but it is in "
                          f"{source.get(k) or 'none of the shards'}"
                          + (f" ({len(wrong) - 1} more such tensors)" if len(wrong) > 1 else ""))
    out = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except Exception as exc:  # noqa: BLE001
            raise unreadable(f, exc) from None
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
    """Our float32 parameters {"text_encoder", "unet", "vae"} from the folder's safetensors of
    ``variant`` (None: full precision; "fp16"; see ``weight_files``). Raises SDError."""
    params = {}
    for comp in COMPONENTS:
        files, index, _ = weight_files(Path(folder) / comp, variant)
        log.info("%s: %s", comp, index.name + f" ({len(files)} shards)" if index else files[0].name)
        params[comp] = to_tree(comp, read_tensors(files, index), template(cfg)[comp], f"{Path(folder) / comp}")
    return jax.tree.map(jnp.asarray, params)


def load(folder, dtype=jnp.float32, variant: str | None = None):
    """A Stable Diffusion 1.x folder (diffusers layout) read into our model.

    Args:
      folder: the local folder (see the module docstring); nothing is downloaded.
      dtype: compute dtype (parameters stay float32).
      variant: None (full precision) or a variant, e.g. "fp16" (see ``weight_files``).
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
