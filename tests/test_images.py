"""The image generator G against docs/study.md A1."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxconcept import config as C, data as D
from jaxconcept.data import images as I


def _render(preset="2x2", sets=(), n=64, seed=0):
    cfg = C.override(C.preset(preset), list(sets))
    sp, p = D.spec(cfg.data), D.params(cfg.data)
    x, cond, y = D.render_all(sp, p, jax.random.PRNGKey(seed), n)
    return cfg, sp, p, np.asarray(x), np.asarray(cond), np.asarray(y)


def test_classes_and_held_out_2x2_and_2x2x2():
    _, sp, *_ = _render(n=1)
    assert sp.class_names == ("red-large", "red-small", "blue-large", "blue-small")
    assert sp.train_classes == (0, 1, 2) and sp.held_out == (3,)
    assert (sp.n_train, sp.n_val) == (1741, 307)  # 2048 split 85/15
    _, sp3, *_ = _render("2x2x2", n=1)
    assert sp3.n_classes == 8 and sp3.class_names[7] == "blue-small-dark" and sp3.held_out == (7,)
    assert sp3.class_values(5) == (1, 0, 1)
    ds = D.dataset(sp, D.params(C.override(C.preset("2x2"), ["data.n_per_class=20"]).data), jax.random.PRNGKey(0))
    assert 3 not in np.asarray(ds["y_train"]) and 3 not in np.asarray(ds["y_val"])


def test_rendered_distribution_matches_spec():
    cfg, sp, p, x, cond, y = _render(n=128)
    h = cfg.data.sep_col / 2
    red, blue = np.array([0.5 + h, 0.5 - h, 0.5 - h]), np.array([0.5 - h, 0.5 - h, 0.5 + h])
    for c in range(4):
        cc = cond[y == c]
        colour = red if c in (0, 1) else blue
        assert np.all(np.abs(cc[:, 4:7] - colour) <= cfg.data.sep_col / 8 + 1e-6)
        size_mean = 0.45 + 0.2 if c in (0, 2) else 0.45 - 0.2
        assert np.all(np.abs(cc[:, 7] - size_mean) <= 0.4 * 3 / 8 + 1e-6) and np.all(cc[:, 7] >= 0.1 - 1e-6)
        assert np.all(cc[:, [0, 1, 2, 3, 8, 9, 10]] == 0)  # non-compositional entries zeroed
        # object colour at the centre pixel of an object drawn at the centre
    z = np.array([1, 0, 0, 0, *red, 0.3, 0.9, 0.9, 0.9], np.float32)
    img = np.asarray(I.render(jnp.asarray(z), jax.random.PRNGKey(0)))
    np.testing.assert_allclose(img[16, 16], red, atol=0.02)
    np.testing.assert_allclose(img[0, 0], [0.9, 0.9, 0.9], atol=0.01)
    # area of the mask (the blur keeps it) ~ pi size^2; the reference's triangle: base s, height s
    def area(shape):
        zz = z.copy(); zz[0:2] = shape; zz[4:7] = 0.0; zz[8:11] = 1.0
        im = np.asarray(I.render(jnp.asarray(zz), jax.random.PRNGKey(0), pixel_noise=0.0))
        return (1 - im[..., 0]).sum() * (2 / 31) ** 2
    assert abs(area([1, 0]) - np.pi * 0.3 ** 2) < 0.03
    side = 0.3 * np.sqrt(4 * np.pi / np.sqrt(3))
    assert abs(area([0, 1]) - side ** 2 / 2) < 0.03
    bg = x[:, 0, 0]  # corners are background: U(0.8, 1) per channel
    assert bg.min() > 0.79 and bg.max() < 1.01


def test_jit_vmap_and_seeds():
    cfg = C.override(C.preset("2x2"), ["data.image_size=16"])
    sp, p = D.spec(cfg.data), D.params(cfg.data)
    labels = jnp.array([0, 1, 2, 3])
    k = jax.random.PRNGKey(1)
    a = D.sample(sp, p, k, labels)
    b = jax.jit(lambda pp, kk: D.sample(sp, pp, kk, labels))(p, k)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert not np.allclose(a[0], D.sample(sp, p, jax.random.PRNGKey(2), labels)[0])
    seps = [0.1, 0.3, 0.5, 0.8]
    ps = [D.params(C.override(cfg, [f"data.sep_col={s}"]).data) for s in seps]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *ps)
    xs, cs = jax.jit(jax.vmap(lambda pp: D.sample(sp, pp, k, labels)))(stacked)
    for i, pp in enumerate(ps):
        np.testing.assert_allclose(xs[i], D.sample(sp, pp, k, labels)[0], atol=1e-6)


def test_signal_grows_with_separation_both_ways_and_the_soft_g_is_differentiable():
    def sig(sets, concept, **kw):
        return D.concept_signal(C.override(C.preset("2x2"), sets).data, n=64, **kw)[concept]
    for method in ("difference", "autodiff"):
        col = [sig([f"data.sep_col={s}"], "colour", method=method) for s in (0.1, 0.4, 0.8)]
        assert col[0] < col[1] < col[2], (method, col)
        sz = [sig([f"data.sep_size={s}"], "size", method=method) for s in (0.1, 0.2, 0.4)]
        assert sz[0] < sz[1] < sz[2], (method, sz)
    # the difference is that of the images themselves: colour enters G linearly, so the L2 distance
    # between the two colours' images of one latent is ||mask|| * ||blue - red|| = ||mask|| sqrt(2) sep_col
    cfg = C.override(C.preset("2x2"), ["data.sep_col=0.4"]).data
    z = jnp.array([1, 0, 0.1, -0.1, 0.5, 0.5, 0.5, 0.3, 0.9, 0.9, 0.9], jnp.float32)
    img = lambda col: I.render(z.at[4:7].set(col), jax.random.PRNGKey(0), pixel_noise=0.0)  # noqa: E731
    red, blue = jnp.array([0.7, 0.3, 0.3]), jnp.array([0.3, 0.3, 0.7])
    mask = (img(jnp.array([0.0, 0.0, 0.0])) - img(jnp.array([1.0, 1.0, 1.0])))[..., 0] * -1
    np.testing.assert_allclose(float(jnp.linalg.norm(img(blue) - img(red))),
                               float(jnp.linalg.norm(mask)) * np.sqrt(2) * 0.4, rtol=1e-4)
    del cfg
    g = jax.jacfwd(lambda zz: I.render(zz, jax.random.PRNGKey(0), pixel_noise=0.0, soft_edge=True))(z)
    norms = np.linalg.norm(np.asarray(g).reshape(-1, 11), axis=0)
    assert np.isfinite(norms).all() and norms[4] > 0 and norms[7] > 0 and norms[2] > 0
    hard = jax.jacfwd(lambda zz: I.render(zz, jax.random.PRNGKey(0), pixel_noise=0.0))(z)
    assert np.linalg.norm(np.asarray(hard)[..., 7]) == 0  # the hard mask has no derivative in size


def _reference_g(z, size=32, sigma=1.0):
    """G as the reference specifies it (docs/study.md A1), in numpy + scipy, noise-free: a hard mask on the
    ij grid linspace(-1, 1), blurred by scipy.ndimage.gaussian_filter (reflect, truncate 4)."""
    from scipy import ndimage

    g = np.linspace(-1.0, 1.0, size)
    dx, dy = g[:, None] - z[2], g[None, :] - z[3]
    if z[0] == 1:
        mask = np.hypot(dx, dy) < z[7]
    else:  # base s (at dy = -s sqrt3/6), height s: edges dy = +-2 dx + (1 - sqrt3/6) s
        s = np.sqrt(4 * np.pi / np.sqrt(3)) * z[7]
        top = (1 - np.sqrt(3) / 6) * s
        mask = (dy > -s * np.sqrt(3) / 6) & (dy < 2 * dx + top) & (dy < -2 * dx + top)
    m = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="reflect", truncate=4.0)[..., None]
    return np.clip(m * z[4:7] + (1 - m) * z[8:11], 0, 1)


def test_rendering_matches_scipy_gaussian_filter_including_objects_at_the_border():
    rng = np.random.default_rng(0)
    worst = 0.0
    for i in range(24):
        shape = [1, 0] if i % 2 == 0 else [0, 1]
        pos = rng.uniform(-0.5, 0.5, 2) if i < 12 else rng.choice([-1.0, -0.95, 0.95, 1.0], 2)  # half at the border
        z = np.array([*shape, *pos, *rng.uniform(0, 1, 3), rng.uniform(0.1, 0.8), *rng.uniform(0, 1, 3)], np.float32)
        got = np.asarray(I.render(jnp.asarray(z), jax.random.PRNGKey(0), pixel_noise=0.0))
        worst = max(worst, np.abs(got - _reference_g(z.astype(np.float64))).max())
    assert worst < 1e-5, worst
    z = np.array([1, 0, 0.9, 0.9, 1, 0, 0, 0.3, 0, 0, 1], np.float32)  # touches two edges
    assert np.abs(np.asarray(I.render(jnp.asarray(z), jax.random.PRNGKey(0), pixel_noise=0.0))
                  - _reference_g(z.astype(np.float64))).max() < 1e-5


def test_masking_zeroes_conditioning():
    _, sp, p, x, cond, y = _render(sets=["data.masked=[\"size\"]"], n=8)
    assert np.all(cond[:, 7] == 0) and np.any(cond[:, 4:7] != 0)
    assert np.all(np.asarray(D.prompts(sp, p))[:, 7] == 0)


def test_cli_data_writes_npz_and_png(tmp_path):
    from PIL import Image

    from jaxconcept.cli import main

    out, png = tmp_path / "d.npz", tmp_path / "d.png"
    assert main(["data", "--preset", "2x2", "--set", "data.image_size=16", "--n-per-class", "3",
                 "--out", str(out), "--show", str(png)]) == 0
    f = np.load(out)
    assert f["images"].shape == (12, 16, 16, 3) and f["cond"].shape == (12, 11)
    assert sorted(set(f["labels"].tolist())) == [0, 1, 2, 3] and float(f["signal_colour"]) > 0
    assert Image.open(png).size[0] > 100
    assert main(["data", "--preset", "2x2"]) == 2
