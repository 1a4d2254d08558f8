"""The SD loader on folders as people have them: sharded weights in two precisions with their
indexes, a ``.non_ema`` file beside them, tokenizers saved as ``tokenizer.json`` only.

Every folder is built here in ``tmp_path`` from the tiny fixture ``fixtures/sd_tiny`` (see
``fixtures/make_sd_tiny.py``), so nothing large is stored.
"""
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxconcept.sd import SDError, weights
from jaxconcept.sd.tokenizer import Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "sd_tiny"
UNET = "diffusion_pytorch_model"


@pytest.fixture(scope="module")
def reference():
    _, params, _ = weights.load(FIXTURE)
    with np.load(FIXTURE / "reference.npz") as f:
        return params, f["prompts"], f["token_ids"]


def _copy(tmp_path, name="sd"):
    dst = tmp_path / name
    shutil.copytree(FIXTURE, dst)
    return dst


def _shard(folder: Path, stem: str, tensors: dict, variant: str | None = None, n: int = 2) -> dict:
    """Write ``tensors`` as ``n`` shards and their index, named as diffusers / transformers name
    them (``stem[.variant]-0000k-of-0000n.safetensors``, ``stem.safetensors.index[.variant].json``)."""
    names = sorted(tensors)
    weight_map = {}
    for k in range(n):
        shard = f"{stem}{'.' + variant if variant else ''}-{k + 1:05d}-of-{n:05d}.safetensors"
        part = {t: tensors[t] for t in names[k::n]}
        save_file(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / f"{stem}.safetensors.index{'.' + variant if variant else ''}.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return weight_map


def _leaves(tree):
    return jax.tree.leaves(jax.tree.map(np.asarray, tree))


def test_weights_are_chosen_by_precision_and_index_never_merged(reference, tmp_path, caplog):
    """fp32 and fp16 shards with their indexes and a .non_ema file in unet/, fp32 and fp16 files in
    text_encoder/: the default reads exactly the fp32 files, ``variant="fp16"`` exactly the fp16
    ones (the fp16 copies are doubled here so that a file read by mistake shows)."""
    params, _, _ = reference
    f = _copy(tmp_path)
    unet = f / "unet" / f"{UNET}.safetensors"
    tensors = load_file(unet)
    unet.unlink()
    _shard(f / "unet", UNET, tensors)
    _shard(f / "unet", UNET, {k: (2 * v).astype(np.float16) for k, v in tensors.items()}, "fp16")
    save_file({k: v + 1 for k, v in tensors.items()}, f / "unet" / f"{UNET}.non_ema.safetensors")
    te = load_file(f / "text_encoder" / "model.safetensors")
    save_file({k: (2 * v).astype(np.float16) if v.dtype.kind == "f" else v for k, v in te.items()},
              f / "text_encoder" / "model.fp16.safetensors")

    with caplog.at_level(logging.INFO, logger="jaxconcept"):
        _, full, _ = weights.load(f)
    for comp in ("unet", "text_encoder", "vae"):
        for a, b in zip(_leaves(full[comp]), _leaves(params[comp])):
            np.testing.assert_array_equal(a, b, err_msg=comp)
    said = [r.getMessage() for r in caplog.records]
    assert any("vae" in m and "no full-precision" in m for m in said), said  # only fp16 there: said so

    _, half, _ = weights.load(f, variant="fp16")
    for comp in ("unet", "text_encoder"):
        for a, b in zip(_leaves(half[comp]), _leaves(params[comp])):
            np.testing.assert_array_equal(a, 2 * b, err_msg=comp)
    for a, b in zip(_leaves(half["vae"]), _leaves(params["vae"])):
        np.testing.assert_array_equal(a, b)

    files, index, variant = weights.weight_files(f / "unet", "non_ema")  # only when asked for
    assert [p.name for p in files] == [f"{UNET}.non_ema.safetensors"] and index is None and variant == "non_ema"


def test_weight_files_that_cannot_be_told_apart_are_refused(tmp_path):
    unet = load_file(FIXTURE / "unet" / f"{UNET}.safetensors")
    cases = {}
    d = tmp_path / "dup"
    d.mkdir()
    weight_map = _shard(d, UNET, unet)
    first = sorted(set(weight_map.values()))[0]
    moved = next(k for k, v in weight_map.items() if v != first)
    save_file({**load_file(d / first), moved: unet[moved]}, d / first)  # a tensor in both shards
    cases[f"tensor {moved} is in both"] = d
    d = tmp_path / "two"
    d.mkdir()
    save_file(unet, d / f"{UNET}.safetensors")
    save_file(unet, d / "other.safetensors")
    cases["ambiguous"] = d
    d = tmp_path / "noindex"
    d.mkdir()
    _shard(d, UNET, unet)
    (d / f"{UNET}.safetensors.index.json").unlink()
    cases["without their index"] = d
    d = tmp_path / "lost"
    d.mkdir()
    _shard(d, UNET, unet)
    (d / f"{UNET}-00002-of-00002.safetensors").unlink()
    cases["not in the folder"] = d
    d = tmp_path / "wrongmap"
    d.mkdir()
    weight_map = _shard(d, UNET, unet)
    weight_map["conv_in.bias"] = "elsewhere.safetensors"
    weight_map.pop("conv_out.bias")
    (d / f"{UNET}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file({}, d / "elsewhere.safetensors")
    cases["places tensor conv_in.bias in elsewhere.safetensors, but it is in diffusion_pytorch_model-0000"] = d
    d = tmp_path / "onlyema"
    d.mkdir()
    save_file(unet, d / f"{UNET}.non_ema.safetensors")
    cases["found only the variants non_ema"] = d
    for want, folder in cases.items():
        with pytest.raises(SDError, match=want) as exc:
            weights.read_tensors(*weights.weight_files(folder)[:2])
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("keep", [("tokenizer.json", "tokenizer_config.json"),
                                  ("vocab.json", "merges.txt", "special_tokens_map.json"),
                                  ("vocab.json", "merges.txt")])
def test_tokenizer_folders_as_saved_by_each_transformers(reference, tmp_path, keep):
    """Current transformers saves tokenizer.json + tokenizer_config.json; SD-1.4's folder has vocab.json,
    merges.txt and special_tokens_map.json. Each gives transformers' ids."""
    _, prompts, token_ids = reference
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in keep:
        shutil.copy(FIXTURE / "tokenizer" / name, folder / name)
    tok = Tokenizer.from_folder(folder, 77)
    for prompt, ids in zip(prompts, token_ids):
        np.testing.assert_array_equal(tok.encode(str(prompt)), ids, err_msg=str(prompt))


def test_special_tokens_come_from_tokenizer_config_too(tmp_path):
    """SD-2's tokenizer pads with "!", written in tokenizer_config.json; a special_tokens_map.json
    beside it wins, as in transformers."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copy(FIXTURE / "tokenizer" / "tokenizer.json", folder)
    config = json.loads((FIXTURE / "tokenizer" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": {"content": "!"}}))
    tok = Tokenizer.from_folder(folder, 77)
    bang = tok.bpe.token_to_id("!")
    assert bang is not None and tok.pad == bang != tok.eos
    ids = tok.encode("a card")
    assert ids[-1] == bang and (ids == tok.eos).sum() == 1
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    assert Tokenizer.from_folder(folder, 77).pad == tok.eos


def test_a_too_long_prompt_is_named_without_quoting_it_whole(reference):
    tok = Tokenizer.from_folder(FIXTURE / "tokenizer", 77)
    prompt = "a triangular credit card " * 40
    with pytest.raises(SDError, match="1000 characters") as exc:
        tok.encode(prompt)
    msg = str(exc.value)
    assert len(msg) < 200 and "at most 75" in msg and msg.count("credit card") < 10, msg
