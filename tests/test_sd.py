"""Stable Diffusion 1.x port (jaxconcept.sd), checked against PyTorch without torch.

``fixtures/sd_tiny/`` is a tiny random SD-1.x folder in the diffusers layout with PyTorch's
outputs for fixed inputs (``reference.npz``), written by ``fixtures/make_sd_tiny.py``. Here our
loader reads it and our networks, tokenizer and sampler are checked against those outputs; then
the overprompting transforms, interventions at tap points, and the ``sd`` command end to end and
on every kind of bad input.
"""
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxconcept.cli import main
from jaxconcept.elicit.edits import Edit
from jaxconcept.sd import SDError, command, overprompt, pipeline as P, weights

FIXTURE = Path(__file__).parent / "fixtures" / "sd_tiny"
TOL = 1e-4  # relative error allowed (float32 on both sides)
PROMPT, CONCEPT, REF = "a triangular credit card", "triangular", "rectangular"


@pytest.fixture(scope="module")
def sd():
    model, params, tok = weights.load(FIXTURE)
    with np.load(FIXTURE / "reference.npz") as f:
        ref = {k: f[k] for k in f.files}
    return dict(model=model, params=params, tok=tok, ref=ref)


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _rel(ours, ref):
    """max |ours - ref| / max |ref| (one number for the whole array)."""
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _eps(s, params):
    r = s["ref"]
    out = P.eps(s["model"], params, _nhwc(r["unet_x"]), jnp.asarray(r["unet_t"]), jnp.asarray(r["unet_context"]))
    return np.asarray(out).transpose(0, 3, 1, 2)


# --- parity ---------------------------------------------------------------------------------------
def test_tokenizer_matches_transformers(sd):
    r, tok = sd["ref"], sd["tok"]
    for prompt, ids in zip(r["prompts"], r["token_ids"]):
        np.testing.assert_array_equal(tok.encode(str(prompt)), ids, err_msg=str(prompt))


def test_networks_match_pytorch(sd):
    s, r = sd, sd["ref"]
    model, params = s["model"], s["params"]
    errs = {"text": _rel(P.encode(model, params, jnp.asarray(r["token_ids"])), r["text_out"]),
            "unet": _rel(_eps(s, params), r["unet_out"])}
    vae = model.apply({"params": params}, _nhwc(r["vae_z"]), method=P.StableDiffusion.decode)
    errs["vae"] = _rel(np.asarray(vae).transpose(0, 3, 1, 2), r["vae_out"])
    print("relative errors", errs)
    assert all(e < TOL for e in errs.values()), errs


def test_ddim_guided_sampler_matches_the_diffusers_pipeline(sd):
    s, r = sd, sd["ref"]
    model, params, tok = s["model"], s["params"], s["tok"]
    cond = P.encode(model, params, jnp.asarray(tok.encode(str(r["pipe_prompt"])))[None])
    null = overprompt.null_conditioning(model, params, tok)
    z = P.sample(model, params, jnp.concatenate([cond, cond]), null, _nhwc(r["pipe_noise"]),
                 n_steps=int(r["pipe_steps"]), guidance=float(r["pipe_guidance"]), chunk=1)
    images = P.decode(model, params, z)
    errs = {"z0": _rel(np.asarray(z).transpose(0, 3, 1, 2), r["pipe_z0"]), "images": _rel(images, r["pipe_images"])}
    print("relative errors", errs)
    assert all(e < TOL for e in errs.values()), errs
    assert np.abs(r["pipe_z0"] - r["pipe_noise"]).max() > 0.5  # the sampler did move the latents


def test_a_wrong_port_is_caught(sd):
    """Plausible porting mistakes move the UNet's output far beyond TOL."""
    s = sd
    unet = s["params"]["unet"]

    def mutated(path, fn):
        p = jax.tree.map(lambda a: a, s["params"])
        d = p["unet"]
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = fn(d[path[-1]])
        return p

    blk = ("down_blocks_0", "attentions_1", "transformer_blocks_0")
    mutations = {
        "3x3 kernel spatially transposed": (("down_blocks_1", "resnets_0", "conv1", "kernel"),
                                            lambda k: k.transpose(1, 0, 2, 3)),
        "linear not transposed": ((*blk, "attn1", "to_out_0", "kernel"), lambda k: k.T),
        "GroupNorm scale not ported": (("conv_norm_out", "scale"), jnp.ones_like),
        "GEGLU halves swapped": ((*blk, "ff", "net_0", "proj", "kernel"), lambda k: jnp.roll(k, k.shape[1] // 2, 1)),
    }
    assert unet["down_blocks_0"]["attentions_1"]["transformer_blocks_0"]["attn1"]["to_out_0"]["kernel"].shape == (16, 16)
    for name, (path, fn) in mutations.items():
        err = _rel(_eps(s, mutated(path, fn)), s["ref"]["unet_out"])
        assert err > 100 * TOL, (name, err)


# --- loader ---------------------------------------------------------------------------------------
def _copy(tmp_path):
    dst = tmp_path / "sd"
    shutil.copytree(FIXTURE, dst)
    return dst


def _edit_config(folder, component, **changes):
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_loader_refuses_what_it_cannot_read(tmp_path):
    cases = {}
    f = _copy(tmp_path)
    _edit_config(f, "unet", use_linear_projection=True)
    cases["use_linear_projection=True is not supported"] = f
    f = _copy(tmp_path / "b")
    _edit_config(f, "text_encoder", intermediate_size=40)
    cases["has shape"] = f
    f = _copy(tmp_path / "b2")
    _edit_config(f, "unet", cross_attention_dim=16)
    cases["cross_attention_dim=16 is not the text encoder's hidden_size=32"] = f
    f = _copy(tmp_path / "c")
    from safetensors.numpy import load_file, save_file

    unet = f / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(unet).items() if k != "conv_out.bias"}, unet)
    cases["no tensor for conv_out.bias"] = f
    f = _copy(tmp_path / "d")
    vae = f / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    extra = {"decoder.up_blocks.2.resnets.0.conv1.weight": np.zeros((16, 16, 3, 3), np.float16)}
    save_file({**load_file(vae), **extra}, vae)  # a third level the config does not have
    cases["decoder.up_blocks.2.resnets.0.conv1.weight has no place"] = f
    f = _copy(tmp_path / "e")
    (f / "unet" / "diffusion_pytorch_model.safetensors").rename(f / "unet" / "diffusion_pytorch_model.bin")
    cases["PyTorch pickles are not read"] = f
    for want, folder in cases.items():
        with pytest.raises(SDError, match=want):
            weights.load(folder)


def test_fp16_and_full_precision_files_load_the_same(sd, tmp_path):
    f = _copy(tmp_path)
    from safetensors.numpy import load_file, save_file

    te = f / "text_encoder" / "model.safetensors"
    save_file({k: v.astype(np.float16) for k, v in load_file(te).items()}, f / "text_encoder" / "model.fp16.safetensors")
    te.unlink()  # only the fp16 variant left: it is read (the weights are float16 values already)
    _, params, _ = weights.load(f)
    for a, b in zip(jax.tree.leaves(params["text_encoder"]), jax.tree.leaves(sd["params"]["text_encoder"])):
        np.testing.assert_array_equal(a, b)


# --- overprompting --------------------------------------------------------------------------------
def _cond(sd, method, strengths, ref=REF, point=None):
    p = overprompt.plan(sd["tok"], PROMPT, CONCEPT, method, strengths, ref)
    return np.asarray(overprompt.conditioning(sd["model"], sd["params"], p, point)), p


def test_strength_zero_is_naive_prompting(sd):
    naive = np.asarray(P.encode(sd["model"], sd["params"], jnp.asarray(sd["tok"].encode(PROMPT))[None]))[0]
    for method in overprompt.METHODS:
        c, _ = _cond(sd, method, [0.0, 2.0])
        np.testing.assert_allclose(c[0], naive, rtol=0, atol=1e-6, err_msg=method)
        assert np.abs(c[1] - naive).max() > 1e-3, method


def test_extrapolate_is_linear_in_s_and_steering_at_the_output_equals_it(sd):
    naive, _ = _cond(sd, "extrapolate", [0.0, 0.0])
    c, _ = _cond(sd, "extrapolate", [1.0, 2.5])
    np.testing.assert_allclose(c[1] - naive[0], 2.5 * (c[0] - naive[0]), atol=1e-5)
    steer, _ = _cond(sd, "steer", [1.0, 2.5], point="text_encoder/conditioning")
    np.testing.assert_allclose(steer, c, atol=1e-5)
    mid, _ = _cond(sd, "steer", [1.0, 2.5])  # the middle layer: not the same as extrapolating
    assert np.abs(mid[1] - c[1]).max() > 1e-3


def test_weight_and_token_touch_only_the_concept_and_what_follows(sd):
    c, p = _cond(sd, "weight", [0.0, 3.0])
    (pos,) = np.nonzero(p.mask)
    assert pos.tolist() == [2]  # [bos, "a", "triangular", ...] in the tiny vocabulary
    np.testing.assert_array_equal(np.delete(c[1], pos, 0), np.delete(c[0], pos, 0))
    np.testing.assert_allclose(c[1, pos], 4.0 * c[0, pos], rtol=1e-6)
    t, _ = _cond(sd, "token", [0.0, 3.0])  # causal attention: the positions before the concept keep their values
    np.testing.assert_allclose(t[1, :pos[0]], t[0, :pos[0]], atol=1e-6)
    assert np.abs(t[1, pos[0]:] - t[0, pos[0]:]).max() > 1e-3


def test_repeat_writes_the_word_again(sd):
    _, p = _cond(sd, "repeat", [0, 2])
    tok = sd["tok"]
    np.testing.assert_array_equal(p.repeat_ids[0], tok.encode(PROMPT))
    np.testing.assert_array_equal(p.repeat_ids[1], tok.encode("a triangular triangular triangular credit card"))


def test_plan_refuses_bad_requests(sd):
    tok = sd["tok"]
    bad = {"not a word of the prompt": (PROMPT, "square", "weight", [0, 1], None),
           "misaligned": (PROMPT, CONCEPT, "extrapolate", [0, 1], "zqx"),
           "needs --ref": (PROMPT, CONCEPT, "steer", [0, 1], None),
           "whole-number": (PROMPT, CONCEPT, "repeat", [0, 0.5], None),
           "at most 75": (PROMPT, CONCEPT, "repeat", [0, 80], None),
           "finite": (PROMPT, CONCEPT, "weight", [0, float("nan")], None)}
    for want, args in bad.items():
        with pytest.raises(SDError, match=want):
            overprompt.plan(tok, args[0], args[1], args[2], args[3], args[4])
    assert overprompt.METHODS == command.METHODS


# --- sampling and interventions -------------------------------------------------------------------
def test_an_edit_at_a_tap_point_changes_the_output_and_strength_zero_does_not(sd):
    s = sd
    model, params, r = s["model"], s["params"], s["ref"]
    names = P.tap_names(model)
    point = "unet/down_blocks_0/attentions_1/transformer_blocks_0/attn2/context"
    assert point in names and "text_encoder/conditioning" in names and "unet/context" in names
    direction = jnp.asarray(r["text_out"][0] - r["text_out"][1])  # [T, D]: triangular - rectangular
    x, t, ctx = _nhwc(r["unet_x"]), jnp.asarray(r["unet_t"]), jnp.asarray(r["unet_context"])
    plain = P.eps(model, params, x, t, ctx)
    out = {a: P.eps(model, params, x, t, ctx, (Edit(point, "add", value=direction, strength=jnp.float32(a)),))
           for a in (0.0, 4.0)}
    np.testing.assert_array_equal(out[0.0], plain)
    assert _rel(out[4.0], np.asarray(plain)) > 1e-3


def test_every_strength_starts_from_the_same_noise(sd):
    s = sd
    model, params, tok = s["model"], s["params"], s["tok"]
    c = P.encode(model, params, jnp.asarray(tok.encode(PROMPT))[None])[0]
    null = overprompt.null_conditioning(model, params, tok)
    noise = jax.random.normal(jax.random.PRNGKey(0), (16, 16, 4))
    x = np.asarray(P.generate(model, params, jnp.stack([c, c]), null, noise, n_steps=4, guidance=7.5, chunk=1))
    np.testing.assert_array_equal(x[0], x[1])  # same conditioning, same noise: the same image
    other = np.asarray(P.generate(model, params, jnp.stack([c, c]), null, -noise, n_steps=4, guidance=7.5, chunk=1))
    assert np.abs(other - x).max() > 1e-2


# --- the command ----------------------------------------------------------------------------------
def _sd(tmp_path, *extra, out="out", size=("--size", "32")):
    return ["sd", str(FIXTURE), "--prompt", PROMPT, "--concept", CONCEPT, "--steps", "4", *size, "--n", "2",
            "--no-progress", "--out", str(tmp_path / out), *extra]


def test_sd_command_end_to_end(tmp_path, capsys):
    """Also: the image size defaults to the model's own. The fixture's UNet samples 16x16 latents and
    its VAE doubles them: 32 px, not SD-1.x's 512 (which asks this tiny model for hundreds of GB)."""
    from jaxconcept.cli import build_parser
    from jaxconcept.sd import configs

    argv = _sd(tmp_path, "--ref", REF, "--strengths", "0,3", size=())
    assert build_parser().parse_args(argv).size is None  # checked first: 512 would run
    assert command.default_size(configs.from_folder(FIXTURE)) == 32
    assert main(argv) == 0
    out = tmp_path / "out"
    Image.open(out / "grid.png").verify()
    with np.load(out / "images.npz") as f:
        images, strengths, seeds = f["images"], f["strengths"], f["seeds"]
    assert images.shape == (2, 2, 32, 32, 3) and images.dtype == np.uint8
    assert strengths.tolist() == [0, 3] and seeds.tolist() == [0, 1]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["method"] == "extrapolate" and settings["steps"] == 4 and settings["seconds"]["sample_and_decode"] > 0
    assert settings["size"] == 32 and settings["variant"] == "fp32"
    assert np.abs(images[0].astype(int) - images[1]).max() > 0  # overprompting changed the images
    assert np.abs(images[0, 0].astype(int) - images[0, 1]).max() > 0  # seeds differ
    err = capsys.readouterr().err  # the files read, one line each (the VAE has only fp16 ones: said so)
    assert "jaxconcept: unet: diffusion_pytorch_model.safetensors\n" in err
    assert "jaxconcept: warning: " in err and "vae: no full-precision (fp32) weights" in err
    # weight at s = 0 is naive prompting too, from the same noise per seed: the same images. The fixture
    # has fp16 files only for the VAE: --variant fp16 reads those and says so for the others; --quiet
    # leaves out the progress lines, not the warnings
    assert main(["--quiet", *_sd(tmp_path, "--method", "weight", "--strengths", "0,0", "--variant", "fp16",
                                 out="w")]) == 0
    with np.load(tmp_path / "w" / "images.npz") as f:
        again = f["images"]
    np.testing.assert_array_equal(again[0], images[0])
    np.testing.assert_array_equal(again[1], images[0])
    out, err = capsys.readouterr()
    assert "jaxconcept sd: weight" in out
    lines = err.splitlines()
    assert len(lines) == 2 and all(ln.startswith("jaxconcept: warning: ") and "no 'fp16'-variant weights" in ln
                                   for ln in lines), err
    assert json.loads((tmp_path / "w" / "settings.json").read_text())["variant"] == "fp16"


def test_sd_out_of_memory_is_one_line_naming_the_size(tmp_path, capsys, monkeypatch):
    """XLA's own out-of-memory error, from a buffer no machine has, stands in for sampling too large
    an image (a real --size 8192 on the fixture ends in the same line, after 25 s on 2 CPU cores)."""
    monkeypatch.setattr(P, "generate", lambda *a, **k: jnp.zeros((2 ** 48,), jnp.float32))  # a petabyte
    assert main(_sd(tmp_path, "--size", "64")) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the lines naming the files read
    assert last.startswith("jaxconcept sd: out of memory") and "--size=64 " in last, last
    assert not (tmp_path / "out").exists()


def test_sd_command_bad_inputs_fail_in_one_line(tmp_path, capsys, monkeypatch):
    layout = tmp_path / "layout"
    (layout / "unet").mkdir(parents=True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        "does not exist": ["sd", str(tmp_path / "nowhere"), "--prompt", PROMPT, "--concept", CONCEPT, "--out",
                           str(tmp_path / "o")],
        "no text_encoder/": ["sd", str(layout), "--prompt", PROMPT, "--concept", CONCEPT, "--out", str(tmp_path / "o")],
        "not a word of the prompt": _sd(tmp_path, "--concept", "square"),
        "misaligned": _sd(tmp_path, "--ref", "zqx"),
        "needs --ref": _sd(tmp_path, "--method", "extrapolate"),
        "whole-number": _sd(tmp_path, "--method", "repeat", "--strengths", "0,0.5"),
        "--strengths": _sd(tmp_path, "--strengths", "0,x"),
        "--size=30": _sd(tmp_path, "--size", "30"),
        "--n=0": _sd(tmp_path, "--n", "0"),
        "--steps=0": _sd(tmp_path, "--steps", "0"),
        "is a file": _sd(tmp_path, out="afile"),
        "--point": _sd(tmp_path, "--point", "unet/context"),
        "(1000 characters) has": _sd(tmp_path, "--prompt", f"{PROMPT} " * 40),
    }
    for want, argv in cases.items():
        assert main(argv) == 2, want
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err and err.startswith("jaxconcept sd: "), (want, err)
        assert len(err) < 300, err  # a long prompt is not quoted whole
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    assert main(_sd(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'jaxconcept[sd]'" in err, err
    assert not (tmp_path / "out").exists()
