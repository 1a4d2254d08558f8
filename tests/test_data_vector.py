"""Vector concept spaces (docs/study.md A6): grid, statistics, nuisance, conditioning, stacking, signal."""
import itertools
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import config as C
from jaxconcept import data as D
from jaxconcept.data import vector as V


def dcfg(**kw):
    """A validated vector DataConfig (held-out classes default to 'all non-training ones')."""
    kw.setdefault("held_out", ())
    return C.Config(data=C.VectorData(**kw), model=C.ModelConfig(arch="mlp")).data


def values_of(spec):
    """Per-class value indices, computed independently of the module (row-major product)."""
    return np.array(list(itertools.product(range(spec.values[0]), repeat=len(spec.values))))


# --------------------------------------------------------------------------------------------
# Static description and per-member arrays
# --------------------------------------------------------------------------------------------
def test_spec_2x2_default_classes():
    sp = V.spec(dcfg())
    assert sp.x_shape == (3,) and sp.cond_dim == 4 and sp.n_classes == 4
    assert sp.concepts == ("dim0", "dim1")
    assert sp.train_classes == (0, 1, 2) and sp.held_out == (3,)


def test_spec_3x3x3_default_and_explicit_classes():
    cfg = dcfg(dim=3, perdim=3, m=(1.0, 1.0, 1.0), s=(0.1, 0.1, 0.1), dim_nuisance=2)
    sp = V.spec(cfg)
    vals = values_of(sp)
    assert sp.n_classes == 27 and sp.x_shape == (5,) and sp.cond_dim == 9
    want_train = tuple(c for c in range(27) if np.count_nonzero(vals[c]) <= 1)
    assert sp.train_classes == want_train and len(want_train) == 7
    assert sp.held_out == tuple(c for c in range(27) if c not in want_train)
    for c in range(27):
        assert sp.class_values(c) == tuple(vals[c])

    sp = V.spec(replace(cfg, train_classes=(0, 4, 13, 26)))
    assert sp.train_classes == (0, 4, 13, 26)
    assert sp.held_out == tuple(c for c in range(27) if c not in (0, 4, 13, 26))
    # explicit held-out classes are removed from the default training set, the rest are neither
    sp = V.spec(replace(cfg, held_out=(1, 5)))
    assert sp.held_out == (1, 5) and sp.train_classes == tuple(c for c in want_train if c != 1)


@pytest.mark.parametrize("normalize", [True, False])
def test_params_means_and_spread(normalize):
    m, s = (1.0, 2.0, 0.5), (0.05, 0.1, 0.2)
    cfg = dcfg(dim=3, perdim=3, m=m, s=s, normalize=normalize)
    sp, p = V.spec(cfg), V.params(cfg)
    ext = 2 * np.array(m) if normalize else np.ones(3)
    np.testing.assert_allclose(V.class_means(sp, p), values_of(sp) * np.array(m)[None] / ext[None], rtol=1e-6)
    np.testing.assert_allclose(V.class_std(sp, p), np.array(s) / ext, rtol=1e-6)
    if normalize:  # every concept spans exactly [0, 1]
        np.testing.assert_allclose(p["mean"].min(0), 0.0)
        np.testing.assert_allclose(p["mean"].max(0), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Sampling statistics
# --------------------------------------------------------------------------------------------
def test_sample_statistics():
    cfg = dcfg(dim=2, perdim=3, m=(1.0, 2.0), s=(0.05, 0.3), normalize=False, dim_nuisance=1)
    sp, p = V.spec(cfg), V.params(cfg)
    n = 2000
    labels = jnp.repeat(jnp.arange(sp.n_classes), n)
    x, _ = V.sample(sp, p, jax.random.PRNGKey(3), labels)
    assert x.shape == (sp.n_classes * n, 3) and x.dtype == jnp.float32
    x = np.asarray(x).reshape(sp.n_classes, n, 3)
    std = np.array([0.05, 0.3])
    mean_tol = 5 * std / np.sqrt(n)  # 5 standard errors
    std_tol = 5 * std / np.sqrt(2 * n)
    want = values_of(sp) * np.array([1.0, 2.0])[None]
    assert np.all(np.abs(x[:, :, :2].mean(1) - want) < mean_tol[None])
    assert np.all(np.abs(x[:, :, :2].std(1) - std[None]) < std_tol[None])
    # gaussian nuisance: N(0, 1) whatever the class
    assert np.all(np.abs(x[:, :, 2].mean(1)) < 5 / np.sqrt(n))
    assert np.all(np.abs(x[:, :, 2].std(1) - 1.0) < 5 / np.sqrt(2 * n))


def test_bimodal_nuisance_covers_every_corner():
    cfg = dcfg(dim_nuisance=2, nuisance="bimodal")
    sp, p = V.spec(cfg), V.params(cfg)
    n = 1001  # not a multiple of 4: counts may differ by one
    x, _ = V.sample(sp, p, jax.random.PRNGKey(0), jnp.zeros((n,), jnp.int32))
    nuis = np.asarray(x[:, 2:])
    corner = np.sign(nuis)
    counts = {c: int(np.all(corner == np.array(c), axis=1).sum()) for c in itertools.product((-1, 1), repeat=2)}
    assert sum(counts.values()) == n
    assert max(counts.values()) - min(counts.values()) <= 1
    resid = nuis - corner
    assert abs(resid.std() - V.NUISANCE_STD) < 0.01


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------
def test_cond_classy_mean_observed():
    base = dict(dim=3, perdim=3, m=(1.0, 1.0, 1.0), s=(0.1, 0.2, 0.3))
    labels = jnp.arange(27).repeat(40)
    key = jax.random.PRNGKey(1)
    vals = values_of(V.spec(dcfg(**base)))

    sp = V.spec(dcfg(**base, cond_mode="classy"))
    p = V.params(dcfg(**base))
    _, c = V.sample(sp, p, key, labels)
    want = np.concatenate([np.eye(3)[vals[:, i]] for i in range(3)], axis=1)  # [27, 9]
    np.testing.assert_array_equal(c, want[np.asarray(labels)])
    np.testing.assert_array_equal(V.prompts(sp, p), want)

    sp = V.spec(dcfg(**base, cond_mode="mean"))
    _, c = V.sample(sp, p, key, labels)
    np.testing.assert_allclose(c, p["mean"][labels])
    np.testing.assert_allclose(V.prompts(sp, p), p["mean"])

    sp = V.spec(dcfg(**base, cond_mode="observed"))
    x, c = V.sample(sp, p, key, labels)
    np.testing.assert_allclose(c, x[:, :3])  # no noise by default: the example's own coordinates
    np.testing.assert_allclose(V.prompts(sp, p), p["mean"])
    noisy = dcfg(**base, cond_mode="observed", cond_noise=0.5)
    assert V.spec(noisy) == sp  # the noise is a per-member data parameter, not part of the static description
    x, c = V.sample(sp, V.params(noisy), key, labels)
    assert abs(float(jnp.std(c - x[:, :3])) - 0.5) < 0.03


@pytest.mark.parametrize("mode", ["classy", "mean", "observed"])
def test_masking_zeroes_only_masked_concepts(mode):
    cfg = dcfg(dim=3, perdim=2, m=(1.0, 1.0, 1.0), s=(0.1, 0.1, 0.1), cond_mode=mode, masked=("dim1",))
    full = replace(cfg, masked=())
    sp, spf, p = V.spec(cfg), V.spec(full), V.params(cfg)
    labels = jnp.arange(8).repeat(4)
    key = jax.random.PRNGKey(2)
    (_, c), (_, cf) = V.sample(sp, p, key, labels), V.sample(spf, p, key, labels)
    per = 2 if mode == "classy" else 1
    masked = np.zeros(sp.cond_dim, bool)
    masked[per:2 * per] = True
    assert np.all(np.asarray(c)[:, masked] == 0)
    np.testing.assert_array_equal(np.asarray(c)[:, ~masked], np.asarray(cf)[:, ~masked])
    assert np.any(np.asarray(cf)[:, masked] != 0)
    pr = np.asarray(V.prompts(sp, p))
    assert np.all(pr[:, masked] == 0)
    np.testing.assert_array_equal(pr[:, ~masked], np.asarray(V.prompts(spf, p))[:, ~masked])


# --------------------------------------------------------------------------------------------
# Transformations, determinism
# --------------------------------------------------------------------------------------------
def test_jit_and_vmap_over_stacked_params():
    ms = [(1.0, 1.0), (2.0, 1.0), (1.0, 3.0)]
    cfgs = [dcfg(m=m, s=(0.1, 0.2), normalize=False, nuisance="bimodal", cond_mode="observed",
                 cond_noise=noise) for m, noise in zip(ms, (0.1, 0.0, 0.3))]
    sp = V.spec(cfgs[0])
    assert all(V.spec(c) == sp for c in cfgs)  # m, s and cond_noise do not touch the static description
    ps = [V.params(c) for c in cfgs]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    labels = jnp.array([0, 1, 2, 3, 3, 2, 1, 0])
    key = jax.random.PRNGKey(7)
    xs, cs = jax.jit(jax.vmap(lambda p: V.sample(sp, p, key, labels)))(stacked)
    for i, p in enumerate(ps):
        x, c = V.sample(sp, p, key, labels)
        np.testing.assert_allclose(xs[i], x, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cs[i], c, rtol=1e-6, atol=1e-6)
    # members with different m really differ
    assert not np.allclose(xs[0], xs[1])
    prs = jax.vmap(lambda p: D.prompts(sp, p))(stacked)
    assert prs.shape == (3, 4, sp.cond_dim)


def test_same_seed_same_data():
    cfg = dcfg(nuisance="bimodal")
    sp, p = V.spec(cfg), V.params(cfg)
    labels = jnp.arange(4).repeat(8)
    a = D.sample(sp, p, jax.random.PRNGKey(5), labels)
    b = D.sample(sp, p, jax.random.PRNGKey(5), labels)
    c = D.sample(sp, p, jax.random.PRNGKey(6), labels)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


# --------------------------------------------------------------------------------------------
# Concept signal
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_concept_signal_is_separation_over_spread(normalize):
    key = jax.random.PRNGKey(0)
    sig = lambda m, s: V.concept_signal(dcfg(m=m, s=s, normalize=normalize), key, 64)  # noqa: E731
    base = sig((1.0, 1.0), (0.1, 0.1))
    assert set(base) == {"dim0", "dim1"}
    wider = sig((2.0, 1.0), (0.1, 0.1))
    assert wider["dim0"] > base["dim0"] and wider["dim1"] == pytest.approx(base["dim1"], rel=1e-5)
    spread = sig((1.0, 1.0), (0.1, 0.4))
    assert spread["dim1"] < base["dim1"] and spread["dim0"] == pytest.approx(base["dim0"], rel=1e-5)
    # dimensionless signal-to-spread ratio m_i / s_i
    assert wider["dim0"] == pytest.approx(2.0 / 0.1, rel=1e-4)
    assert spread["dim1"] == pytest.approx(1.0 / 0.4, rel=1e-4)
    # the generic entry point dispatches here
    assert D.concept_signal(dcfg(m=(1.0, 1.0), s=(0.1, 0.1), normalize=normalize), key, 64) == base


# --------------------------------------------------------------------------------------------
# Datasets through the generic interface
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vec2x2", "vec2x2x2", "vec_tiny"])
def test_dataset_on_presets(name):
    cfg = replace(C.preset(name).data, n_per_class=40)
    sp, p = D.spec(cfg), D.params(cfg)
    ds = D.dataset(sp, p, jax.random.PRNGKey(0))
    n_tr, n_cls = sp.n_train, len(sp.train_classes)
    assert n_tr == 40 and sp.n_val >= 1
    assert ds["x_train"].shape == (n_cls * n_tr, cfg.dim + cfg.dim_nuisance)
    assert ds["c_train"].shape == (n_cls * n_tr, sp.cond_dim)
    assert ds["x_val"].shape == (n_cls * sp.n_val, cfg.dim + cfg.dim_nuisance)
    assert ds["x_train"].dtype == jnp.float32 and ds["c_train"].dtype == jnp.float32
    assert set(np.unique(ds["y_train"]).tolist()) == set(sp.train_classes)
    assert set(np.unique(ds["y_val"]).tolist()) <= set(sp.train_classes)
    assert not set(sp.held_out) & set(np.unique(ds["y_train"]).tolist())
    assert len(sp.held_out) == sp.n_classes - 1 - cfg.dim  # only multi-concept corners held out
    # each training example sits near its class mean (within 6 spreads on every concept dim)
    dev = np.abs(np.asarray(ds["x_train"][:, :cfg.dim]) - np.asarray(p["mean"])[np.asarray(ds["y_train"])])
    assert np.all(dev < 6 * np.asarray(p["std"])[None])
    x, cond, labels = D.render_all(sp, p, jax.random.PRNGKey(1), 3)
    assert x.shape == (sp.n_classes * 3, cfg.dim + cfg.dim_nuisance) and cond.shape == (sp.n_classes * 3, sp.cond_dim)


def test_cli_data_show_draws_vector_data_in_concept_space(tmp_path, capsys):
    """``data --show`` on vector data: a scatter of the concept coordinates (two concepts, and the
    first two of three), not an image grid; a sweep says in one line that it renders one member."""
    from PIL import Image

    from jaxconcept.cli import main

    for name, sets in (("two", ["seeds=[0,1]"]), ("three", ["data.dim=3", "data.m=[1,1,1]", "data.s=[0.1,0.1,0.1]"])):
        png = tmp_path / f"{name}.png"
        capsys.readouterr()
        assert main(["data", "--preset", "vec_tiny", "--show", str(png), *[a for s in sets for a in ("--set", s)]]) == 0
        Image.open(png).verify()
        out, err = capsys.readouterr()
        assert out == f"wrote {png}\n"
        assert err == ("jaxconcept: the config is a sweep; rendering its first member\n" if name == "two" else ""), err
