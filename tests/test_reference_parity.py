"""Numerical parity with the reference's PyTorch U-Net and VDM loss (no torch needed).

``fixtures/reference_parity.npz`` holds a small reference ``CUNet`` (widths 16/32, one ResNet
block per level, middle attention, ``sep_mlp`` conditioning) with random weights, its eps
predictions at a few inputs, and its three VDM loss terms for fixed draws of t, eps and eps_0;
``fixtures/make_reference_parity.py`` wrote it and says how to regenerate it. Here the stored
weights are ported into our Flax tree and our network and loss are checked against the outputs.

Porting (torch -> flax): conv [out, in, kh, kw] -> [kh, kw, in, out]; linear [out, in] -> [in, out];
transposed conv [in, out, kh, kw] -> [kh, kw, in, out] with the spatial taps flipped (Flax's
``ConvTranspose`` does not flip its kernel, PyTorch's transposed conv is the gradient of a conv);
GroupNorm weight/bias -> scale/bias. Attention: the reference splits channels into heads
interleaved (channel = i * heads + head), we in contiguous blocks (channel = head * d + i), so
q, k, v outputs and the output projection's inputs are permuted (the same function, with the
same init distribution). The reference's up path is indexed deepest first.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import config as C, data as D, vdm, nets

FIXTURE = Path(__file__).parent / "fixtures" / "reference_parity.npz"
TOL = 1e-4  # relative error allowed (float32 throughout on both sides)


def _conv(w, b):
    return {"kernel": w.transpose(2, 3, 1, 0), "bias": b}


def _conv_transpose(w, b):
    return {"kernel": w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1), "bias": b}


def _dense(w, b):
    return {"kernel": w.T, "bias": b}


def _gn(w, b):
    return {"scale": w, "bias": b}


def _heads_perm(c, heads):
    """perm[ours] = reference channel: ours head * d + i is the reference's i * heads + head."""
    d = c // heads
    return np.array([(o % d) * heads + o // d for o in range(c)])


def port(ref_params, model_cfg):
    """The reference's state dict (``{name: array}``, torch layout) as our parameter tree.

    Returns (params, used): {"net", "gamma"} and the set of reference names consumed.
    """
    used = set()

    def get(name):
        key = f"model.score_model.{name}" if not name.startswith("model.") else name
        used.add(key)
        return np.asarray(ref_params[key])

    def pair(name):
        return get(f"{name}.weight"), get(f"{name}.bias")

    def block(name, c_in, c_out):
        p = {"norm_0": _gn(*pair(f"{name}.net1.0")), "conv_0": _conv(*pair(f"{name}.net1.2")),
             "emb_t": {"dense_0": _dense(*pair(f"{name}.cond_projs.0.0")),
                       "dense_1": _dense(*pair(f"{name}.cond_projs.0.2"))},
             "emb_c": {"dense_0": _dense(*pair(f"{name}.cond_projs.1.0")),
                       "dense_1": _dense(*pair(f"{name}.cond_projs.1.2"))},
             "norm_1": _gn(*pair(f"{name}.net2.0")),
             # the reference's net2 is [GN, GELU, Dropout, conv] with dropout > 0, [GN, GELU, conv] without
             "conv_1": _conv(*pair(f"{name}.net2.{3 if model_cfg.dropout > 0 else 2}"))}
        if c_in != c_out:
            p["skip"] = _conv(*pair(f"{name}.skip_conv"))
        return p

    m = model_cfg
    widths = [m.ch * k for k in m.ch_mult]
    n_levels = len(widths)
    net = {"time_embed": {"dense_0": _dense(*pair("embed_t_conditioning.0")),
                          "dense_1": _dense(*pair("embed_t_conditioning.2"))},
           "conv_in": _conv(*pair("conv_in"))}
    c = widths[0]
    for i, w in enumerate(widths):
        for j in range(m.num_res_blocks):
            net[f"down_{i}_block_{j}"] = block(f"downs.{i}.resnet_blocks.{j}", c, w)
            c = w
        if i < n_levels - 1:
            net[f"down_{i}_downsample"] = _conv(*pair(f"downs.{i}.down"))
    net["mid_block_0"] = block("mid1", c, c)
    perm = _heads_perm(c, m.num_heads)
    wq, bq = pair("mid_attn1.q")
    wk, bk = pair("mid_attn1.k")
    wv, bv = pair("mid_attn1.v")
    wo, bo = pair("mid_attn1.proj_out")
    net["mid_attn"] = {"norm": _gn(*pair("mid_attn1.norm")), "q": _conv(wq[perm], bq[perm]),
                       "k": _conv(wk[perm], bk[perm]), "v": _conv(wv[perm], bv[perm]),
                       "proj": _conv(wo[:, perm], bo)}
    net["mid_block_1"] = block("mid2", c, c)
    for i in reversed(range(n_levels)):
        k = n_levels - 1 - i  # the reference's ups are indexed deepest first
        for j in range(m.num_res_blocks):
            skip = widths[i] if (j == 0 and i < n_levels - 1) else 0
            net[f"up_{i}_block_{j}"] = block(f"ups.{k}.resnet_blocks.{j}", widths[i] + skip, widths[i])
        if i > 0:
            net[f"up_{i}_upsample"] = _conv_transpose(*pair(f"ups.{k}.up"))
    net["norm_out"] = _gn(*pair("norm_out"))
    net["conv_out"] = _conv(*pair("conv_out"))
    gamma = {"b": get("model.gamma.b"), "w": get("model.gamma.w")}
    return jax.tree.map(lambda a: jnp.asarray(np.array(a), jnp.float32), {"net": net, "gamma": gamma}), used


def _config(c):
    cfg = C.override(C.preset("2x2"), [
        f"data.image_size={c['image_size']}", f"model.ch={c['chs'][0]}",
        f"model.ch_mult={json.dumps([w // c['chs'][0] for w in c['chs']])}",
        f"model.num_res_blocks={c['num_res_blocks']}", f"model.norm_groups={c['norm_groups']}",
        f"model.num_heads={c['n_attention_heads']}", "model.mid_attention=true",
        f"model.time_embed_dim={c['t_embedding_dim']}", f"model.embed_dim={4 * c['t_embedding_dim']}",
        "model.conditioning=\"sep_mlp\"", f"model.dropout={c['dropout_prob']}",
        f"model.gamma_min={c['gamma_min']}", f"model.gamma_max={c['gamma_max']}",
        f"model.data_noise={c['data_noise']}"])
    return C.members(cfg)[0]


def load():
    """The fixture, its config, our network and the ported parameters, as a dict."""
    with np.load(FIXTURE) as f:
        ref = {k: f[k] for k in f.files}
    c = json.loads(str(ref["config"]))
    cfg = _config(c)
    spec = D.spec(cfg.data)
    assert spec.x_shape == (c["image_size"], c["image_size"], 3) and spec.cond_dim == c["cond_dim"]
    net = nets.build(cfg.model, spec)
    params, used = port({k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}, cfg.model)
    # One compiled network for every call (the loss's other operations run eagerly): compiling is
    # most of this file's time.
    apply_fn = jax.jit(vdm.make_apply(net), static_argnums=4)
    return dict(ref=ref, c=c, cfg=cfg, spec=spec, net=net, params=params, used=used, apply_fn=apply_fn)


@pytest.fixture(scope="module")
def setup():
    return load()


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _rel(ours, ref):
    """Relative error per example (max |ours - ref| / max |ref| over each example), the largest."""
    diff = np.abs(np.asarray(ours, np.float64) - ref).reshape(len(ref), -1).max(axis=1)
    return float(np.max(diff / np.abs(ref).reshape(len(ref), -1).max(axis=1)))


def _eps(s, params):
    r = s["ref"]
    out = s["apply_fn"](params["net"], _nhwc(r["net_z"]), jnp.asarray(r["net_t"]), jnp.asarray(r["net_cond"]), False,
                        jax.random.PRNGKey(0))
    return _nchw(out)


def test_ported_tree_is_ours_and_counts_match_the_reference_less_its_unused_layers(setup):
    s = setup
    ref, c = s["ref"], s["c"]
    template = jax.eval_shape(lambda k: vdm.init_params(s["net"], s["cfg"].model, s["spec"], k),
                              jax.random.PRNGKey(0))
    assert jax.tree.structure(s["params"]) == jax.tree.structure(template)
    for a, b in zip(jax.tree.leaves(s["params"]), jax.tree.leaves(template)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # The reference builds a downsampling conv after its last level and a transposed conv after
    # its last up level (level 0) that its forward pass never calls; the fixture recorded which
    # parameters were never called, and they are exactly those, and the only ones not ported.
    last = len(c["chs"]) - 1
    unused = {f"model.score_model.{m}.{k}" for m in (f"downs.{last}.down", f"ups.{last}.up") for k in ("weight", "bias")}
    assert set(ref["unused"].tolist()) == unused
    every = {k[len("param/"):] for k in ref if k.startswith("param/")}
    assert s["used"] == every - unused
    w0, wl = c["chs"][0], c["chs"][-1]
    n_unused = (wl * wl * 4 + wl) + (w0 * w0 * 4 + w0)
    assert sum(int(np.asarray(ref[f"param/{k}"]).size) for k in unused) == n_unused
    assert nets.param_count(s["params"]) == nets.param_count(template) == int(ref["n_params_reference"]) - n_unused


def test_eps_prediction_matches_the_reference(setup):
    s = setup
    r = s["ref"]
    ours = _eps(s, s["params"])
    err = _rel(ours, r["net_eps"])
    # the network's own part (the output is the input plus it), which the input's size could hide
    err_net = _rel(ours - r["net_z"], r["net_eps"] - r["net_z"])
    assert err < TOL and err_net < TOL, (err, err_net)
    assert np.abs(r["net_eps"] - r["net_z"]).max() > 0.1  # the fixture's network does change its input


def test_loss_terms_match_the_reference(setup):
    s = setup
    r = s["ref"]
    x, cond = _nhwc(r["x"]), jnp.asarray(r["cond"])
    draws = {"t": jnp.asarray(r["t"]), "eps": _nhwc(r["eps"]), "eps_0": _nhwc(r["eps_0"])}
    terms = vdm.loss_terms(s["apply_fn"], s["cfg"].model, s["params"], x, cond, jax.random.PRNGKey(0),
                                 train=False, draws=draws)
    errs = {}
    for name in ("diffusion", "latent", "recon"):
        ref_v = r[f"loss_{name}"].astype(np.float64)
        assert terms[name].shape == ref_v.shape == (x.shape[0],)
        errs[name] = float(np.max(np.abs(np.asarray(terms[name], np.float64) - ref_v) / np.abs(ref_v)))
    assert all(e < TOL for e in errs.values()), errs


def test_a_wrong_port_is_caught(setup):
    """The fixture is sensitive: each plausible porting mistake moves eps far beyond TOL."""
    s = setup
    r, p = s["ref"], s["params"]
    net = p["net"]
    def with_(path, fn):
        q = jax.tree.map(lambda a: a, net)
        d = q
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = fn(d[path[-1]])
        return {"net": q, "gamma": p["gamma"]}

    mutations = {
        "3x3 kernel spatially transposed": (("mid_block_0", "conv_0", "kernel"), lambda k: k.transpose(1, 0, 2, 3)),
        "transposed conv not flipped": (("up_1_upsample", "kernel"), lambda k: k[::-1, ::-1]),
        "q's channels in the wrong heads": (("mid_attn", "q", "kernel"),
                                            lambda k: k[..., _heads_perm(k.shape[-1], s["cfg"].model.num_heads)]),
        "linear not transposed": (("down_1_block_0", "emb_t", "dense_1", "kernel"), lambda k: k.T),
        "GroupNorm scale off": (("norm_out", "scale"), lambda a: jnp.ones_like(a)),
        "zero-init conv left at zero": (("down_0_block_0", "conv_1", "kernel"), jnp.zeros_like),
    }
    for name, (path, fn) in mutations.items():
        err = _rel(_eps(s, with_(path, fn)), r["net_eps"])
        assert err > 100 * TOL, (name, err)
