"""Parameter parity with the reference U-Net, and the networks' basic contracts."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import config as C, data as D, vdm, nets

REFERENCE = 10_913_861
# The reference builds a downsampling conv for its last level (256*256*2*2 + 256) and a transposed
# conv for its last up level (64*64*2*2 + 64) that its forward pass never calls; we do not build them.
UNUSED_IN_REFERENCE = (256 * 256 * 4 + 256) + (64 * 64 * 4 + 64)


def _count(cfg):
    spec = D.spec(cfg.data)
    net = nets.build(cfg.model, spec)
    return nets.param_count(jax.eval_shape(lambda k: vdm.init_params(net, cfg.model, spec, k), jax.random.PRNGKey(0)))


def test_parameter_count_matches_reference_less_its_unused_layers():
    assert _count(C.preset("2x2")) == REFERENCE - UNUSED_IN_REFERENCE


def test_shapes_taps_and_vmap_over_parameter_sets():
    for name in ("tiny", "vec_tiny"):
        cfg = C.preset(name)
        spec = D.spec(cfg.data)
        net = nets.build(cfg.model, spec)
        apply_fn = vdm.make_apply(net)
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        stack = jax.jit(jax.vmap(lambda k: vdm.init_params(net, cfg.model, spec, k)))(keys)  # noqa: B023
        x = jax.random.normal(jax.random.PRNGKey(1), (3, *spec.x_shape))
        t, c = jnp.full((3,), 0.5), jnp.ones((3, spec.cond_dim))
        one = jax.jit(lambda p: apply_fn(p["net"], x, t, c, False, keys[0]))  # noqa: B023 - jitted: one program each
        out = jax.jit(jax.vmap(one))(stack)
        assert out.shape == (4, 3, *spec.x_shape)
        for i in range(4):
            p = jax.tree.map(lambda a: a[i], stack)  # noqa: B023
            np.testing.assert_allclose(out[i], one(p), rtol=1e-5, atol=1e-5)
        names = nets.tap_names(net, spec)
        assert any(n.endswith("cond_c") for n in names) and any(n.endswith("cond_t") for n in names)


def test_bfloat16_compute_close_to_float32():
    cfg = C.preset("tiny")
    spec = D.spec(cfg.data)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, *spec.x_shape))
    t, c = jnp.full((2,), 0.5), jnp.ones((2, spec.cond_dim))
    outs = []
    for dtype in ("float32", "bfloat16"):
        m = C.override(cfg, [f"model.dtype=\"{dtype}\""]).model
        net = nets.build(m, spec)
        p = jax.jit(lambda k: vdm.init_params(net, m, spec, k))(jax.random.PRNGKey(0))  # noqa: B023
        p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(3), a.shape), p)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))  # fp32 parameters
        apply_fn = jax.jit(vdm.make_apply(net), static_argnums=4)  # one program, not one per op
        outs.append(np.asarray(apply_fn(p["net"], x, t, c, False, jax.random.PRNGKey(0))))
    assert outs[1].dtype == np.float32 and np.isfinite(outs[1]).all()
    assert np.abs(outs[1] - outs[0]).max() < 0.1 * (np.abs(outs[0]).max() + 1)
