"""Score networks: reference parameter parity, shapes, tap points, conditioning variants,
initialisation, vmap over parameter sets, bf16 compute, and the ``info`` command."""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.flatten_util import ravel_pytree

from jaxconcept import cli, config as C, data as D, vdm, nets
from jaxconcept.nets.layers import Tap

REFERENCE_2X2 = 10_913_861  # docs/study.md A2: the reference U-Net plus the two schedule parameters


def _setup(name, *sets):
    cfg = C.override(C.preset(name), list(sets))
    spec = D.spec(cfg.data)
    return cfg, spec, nets.build(cfg.model, spec)


def _shapes(net, cfg, spec):
    return jax.eval_shape(lambda k: vdm.init_params(net, cfg.model, spec, k), jax.random.PRNGKey(0))


def _init(name, *sets):
    """Initial parameters of a preset (float32 whatever the compute dtype), computed once per model
    config in this module: a U-Net init compiles for seconds."""
    cfg, spec, _ = _setup(name, *sets)
    return _init_model(dataclasses.replace(cfg.model, dtype="float32"), spec)


@functools.lru_cache(maxsize=None)
def _init_model(model_cfg, spec):
    net = nets.build(model_cfg, spec)
    return jax.jit(lambda k: vdm.init_params(net, model_cfg, spec, k))(jax.random.PRNGKey(0))


def _perturb(tree, key, scale=0.05, keep=lambda path: False):
    """Random offsets on every leaf (one random draw for the whole tree), so zero-initialised layers
    pass signal; leaves whose path satisfies ``keep`` stay as they are."""
    flat, unravel = ravel_pytree(tree)
    noisy = unravel(flat + scale * jax.random.normal(key, flat.shape))
    return jax.tree_util.tree_map_with_path(lambda path, a, b: a if keep(jax.tree_util.keystr(path)) else b,
                                            tree, noisy)


def test_unet_parameter_count_matches_the_reference_less_its_two_uncalled_layers():
    cfg, spec, net = _setup("2x2")
    n = nets.param_count(_shapes(net, cfg, spec))
    w = [cfg.model.ch * m for m in cfg.model.ch_mult]
    # The reference's ResNetDown builds a 2x2 downsampling conv for its last level and its ResNetUp a
    # 2x2 transposed conv for level 0, but its forward skips both (no_down / no_up); we omit them.
    uncalled = (w[-1] * w[-1] * 4 + w[-1]) + (w[0] * w[0] * 4 + w[0])
    assert uncalled == 278_848
    assert n + uncalled == REFERENCE_2X2


def test_mlp_parameter_count_follows_the_reference_layout():
    cfg, spec, net = _setup("vec2x2")
    n = nets.param_count(_shapes(net, cfg, spec)["net"])
    d, c, h, e, te = spec.x_shape[0], spec.cond_dim, cfg.model.hidden[0], cfg.model.embed_dim, cfg.model.time_embed_dim
    lin = lambda i, o: i * o + o  # noqa: E731
    expect = (lin(te, e) + lin(e, e)  # time embedding
              + lin(d, h) + lin(e, h) + lin(h, h) + lin(c, h) + lin(h, h)  # hidden layer + its two embedders
              + lin(h, d))  # output
    assert (d, c) == (3, 4) and n == expect


@pytest.mark.parametrize("name", ["tiny", "vec_tiny"])
def test_shapes_float32_and_vmap_over_parameter_sets(name):
    cfg, spec, net = _setup(name)
    apply_fn = vdm.make_apply(net)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    stack = jax.jit(jax.vmap(_perturb, in_axes=(None, 0)))(_init(name), keys)  # 4 distinct parameter sets
    x = jax.random.normal(jax.random.PRNGKey(1), (3, *spec.x_shape))
    t, c = jnp.array([0.1, 0.5, 0.9]), jax.random.uniform(jax.random.PRNGKey(2), (3, spec.cond_dim))
    one = jax.jit(lambda p: apply_fn(p["net"], x, t, c, False, keys[0]))
    out = jax.jit(jax.vmap(one))(stack)
    assert out.shape == (4, 3, *spec.x_shape) and out.dtype == jnp.float32
    for i in range(4):
        np.testing.assert_allclose(out[i], one(jax.tree.map(lambda a: a[i], stack)), rtol=2e-5, atol=2e-5)
    assert not np.allclose(out[0], out[1])  # the members really differ


def test_unet_is_the_identity_at_init_and_dropout_only_in_training():
    cfg, spec, net = _setup("tiny")
    p = _init("tiny")["net"]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, *spec.x_shape))
    t, c = jnp.full((2,), 0.3), jnp.ones((2, spec.cond_dim))
    f = jax.jit(lambda p, train, k: net.apply({"params": p}, x, t, c, train, rngs={"dropout": k}), static_argnums=1)
    np.testing.assert_allclose(f(p, False, jax.random.PRNGKey(0)), x, atol=1e-6)  # zero conv_out + input residual
    p = _perturb(p, jax.random.PRNGKey(3))
    a, b = f(p, True, jax.random.PRNGKey(0)), f(p, True, jax.random.PRNGKey(1))
    assert not np.allclose(a, b)  # dropout draws from the "dropout" rng
    np.testing.assert_allclose(f(p, False, jax.random.PRNGKey(0)), f(p, False, jax.random.PRNGKey(1)))


def _expected_unet_taps(m):
    blocks = [f"down_{i}_block_{j}" for i in range(len(m.ch_mult)) for j in range(m.num_res_blocks)]
    blocks += ["mid_block_0"]
    mid = ["mid_attn/out"] if m.mid_attention else []
    up = [f"up_{i}_block_{j}" for i in reversed(range(len(m.ch_mult))) for j in range(m.num_res_blocks)]
    per = lambda bs: [f"{b}/{k}" for b in bs for k in ("cond_t", "cond_c", "out")]  # noqa: E731
    return per(blocks) + mid + per(["mid_block_1"] + up)


def test_tap_names_are_stable_and_complete():
    cfg, spec, net = _setup("tiny")
    names = nets.tap_names(net, spec)
    assert names == _expected_unet_taps(cfg.model) == nets.tap_names(nets.build(cfg.model, spec), spec)
    _, spec2, net2 = _setup("2x2")
    assert nets.tap_names(net2, spec2) == _expected_unet_taps(C.preset("2x2").model)
    vcfg, vspec, vnet = _setup("vec_tiny", "model.hidden=[16, 8]")
    assert nets.tap_names(vnet, vspec) == [f"layer_{i}/{k}" for i in range(2) for k in ("cond_t", "cond_c", "out")]


def test_taps_carry_the_projections_and_an_interceptor_can_edit_them():
    cfg, spec, net = _setup("tiny")
    p = _perturb(_init("tiny")["net"], jax.random.PRNGKey(4))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, *spec.x_shape))
    t, c = jnp.full((2,), 0.3), jnp.ones((2, spec.cond_dim))
    seen = {}

    def fn(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if isinstance(ctx.module, Tap):
            name = "/".join(ctx.module.path)
            seen[name] = out.shape
            if name == "mid_block_0/cond_c":
                out = out + 1.0
        return out

    def run(edit):
        if not edit:
            return net.apply({"params": p}, x, t, c, False)
        with nn.intercept_methods(fn):
            return net.apply({"params": p}, x, t, c, False)

    base, edited = jax.jit(lambda: run(False))(), jax.jit(lambda: run(True))()
    assert not np.allclose(base, edited)
    widths = {"down_0": 8, "down_1": 16, "mid": 16, "up_1": 16, "up_0": 8}
    for name, shape in seen.items():
        if name.endswith(("cond_c", "cond_t")):
            assert shape == (2, widths[name.rsplit("_block", 1)[0]]), (name, shape)


@pytest.mark.parametrize("conditioning", ["sep_mlp", "common_linear", "common_zerolinear"])
def test_conditioning_variants(conditioning):
    cfg, spec, net = _setup("tiny", f"model.conditioning={conditioning}")
    p = _init("tiny", f"model.conditioning={conditioning}")["net"]
    assert ("cond_embed" in p) == (conditioning != "sep_mlp")
    emb_c = p["mid_block_0"]["emb_c"]
    if conditioning == "sep_mlp":
        assert emb_c["dense_0"]["kernel"].shape == (spec.cond_dim, 16)
    else:
        assert emb_c["kernel"].shape == (64, 16)  # from the shared 64-wide concept embedding
        assert (np.abs(emb_c["kernel"]).max() == 0) == (conditioning == "common_zerolinear")
    # the zero-initialised convs (conv_1, conv_out) hide every block at init: perturb all but emb_*
    p = _perturb(p, jax.random.PRNGKey(5), keep=lambda path: "emb_" in path)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, *spec.x_shape))
    f = jax.jit(lambda c: net.apply({"params": p}, x, jnp.full((2,), 0.3), c, False))
    changed = not np.allclose(f(jnp.zeros((2, spec.cond_dim))), f(jnp.ones((2, spec.cond_dim))), atol=1e-6)
    assert changed == (conditioning != "common_zerolinear")  # zero projections hide cond at init


def test_init_follows_pytorch_defaults_and_init_scale():
    cfg, spec, net = _setup("vec2x2")
    p = _init("vec2x2")["net"]
    k = np.asarray(p["layer_0"]["emb_t"]["dense_1"]["kernel"])  # Linear(1024 -> 1024)
    bound = 1 / math.sqrt(1024)
    assert np.abs(k).max() <= bound and abs(k.std() - bound / math.sqrt(3)) < 0.02 * bound
    assert np.abs(p["layer_0"]["emb_t"]["dense_1"]["bias"]).max() > 0.5 * bound  # biases not zero
    p2 = _init("vec2x2", "model.init_scale=0.1")
    for a, b in zip(jax.tree.leaves(p2["net"]), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, 0.1 * b, rtol=1e-6)
    assert float(p2["gamma"]["b"]) == cfg.model.gamma_min  # the schedule is not scaled


def test_bfloat16_compute_is_finite_and_close_to_float32():
    cfg, spec, _ = _setup("tiny")
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, *spec.x_shape))
    t, c = jnp.array([0.2, 0.7]), jnp.ones((2, spec.cond_dim))
    outs = []
    for dtype in ("float32", "bfloat16"):
        m = C.override(cfg, [f"model.dtype={dtype}"]).model
        net = nets.build(m, spec)
        p = _perturb(_init("tiny", f"model.dtype={dtype}")["net"], jax.random.PRNGKey(3))
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))  # fp32 parameters
        outs.append(np.asarray(jax.jit(lambda p: net.apply({"params": p}, x, t, c, False))(p)))
    assert outs[1].dtype == np.float32 and np.isfinite(outs[1]).all()
    err, scale = np.abs(outs[1] - outs[0]).max(), np.abs(outs[0] - np.asarray(x)).max()
    assert 0 < err < 0.1 * scale  # really computed in bf16, and close


def test_info_prints_parameter_count_and_flops(capsys):
    assert cli.main(["info", "--preset", "vec_tiny"]) == 0
    out = capsys.readouterr().out
    cfg, spec, net = _setup("vec_tiny")
    assert f"{nets.param_count(_shapes(net, cfg, spec)):,}" in out and "GFLOP" in out
