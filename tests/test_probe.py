"""The concept probe: exact vector probe, trained conv probe, the accuracy bar, the cache."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import config as C
from jaxconcept import data as D
from jaxconcept.analysis import probe as P

H = 8  # fake images: 8x8, colour x size, so the conv probe trains in a few seconds
_G = jnp.linspace(-1, 1, H)
TABLE = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])  # class -> (colour, size) value indices


def fake_images(key, labels, informative=True):
    """A disc on a light background; colour and size follow the label (or, if not
    ``informative``, an independent random label, so no probe can do better than chance)."""
    n = labels.shape[0]
    k_pos, k_r, k_bg, k_lab = jax.random.split(key, 4)
    if not informative:
        labels = jax.random.randint(k_lab, (n,), 0, 4)
    cx, cy = jax.random.uniform(k_pos, (2, n), minval=-0.4, maxval=0.4)
    r = jnp.where(labels % 2 == 1, 0.35, 0.7) + jax.random.uniform(k_r, (n,), minval=-0.05, maxval=0.05)
    yy, xx = jnp.meshgrid(_G, _G, indexing="ij")
    d = jnp.sqrt((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2)  # [n, H, H]
    m = (d < r[:, None, None]).astype(jnp.float32)[..., None]
    col = jnp.where((labels // 2 == 1)[:, None], jnp.array([0.3, 0.3, 0.7]), jnp.array([0.7, 0.3, 0.3]))
    bg = jax.random.uniform(k_bg, (n, 3), minval=0.8, maxval=1.0)
    return m * col[:, None, None, :] + (1 - m) * bg[:, None, None, :]


def _test_set(informative=True):
    y = jnp.repeat(jnp.arange(4), 64)
    return np.asarray(fake_images(jax.random.PRNGKey(99), y, informative)), np.asarray(y)


# --------------------------------------------------------------------------------------------
# Conv probe (fake G, so these run before and regardless of the image data module)
# --------------------------------------------------------------------------------------------
def test_conv_probe_reaches_the_bar_on_every_class():
    net = P.ProbeNet((2, 2), widths=(16, 16, 16))
    x, y = _test_set()
    params, acc, steps, met = P.fit(net, fake_images, TABLE, jax.random.PRNGKey(0), x, y, max_steps=1500)
    assert met and acc.shape == (4, 2) and acc.min() >= 0.99 and steps <= 1500
    probe = P.Probe("images", ("colour", "size"), (2, 2), net_params=params, widths=(16, 16, 16), accuracy=acc)
    xf, yf = _test_set()  # same distribution, checked through the public API
    probs = P.predict(probe, xf)
    assert probs.shape == (len(xf), 2, 2) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    assert P.correct(probe, xf, TABLE[yf]).mean() >= 0.98
    z = P.coordinates(probe, xf)  # P(second value): P(blue), P(small)
    assert np.allclose(z, probs[..., 1], atol=1e-6)
    assert np.abs(z[yf == 3].mean(0) - [1, 1]).max() < 0.1 and np.abs(z[yf == 0].mean(0)).max() < 0.1


def test_conv_probe_undertrained_or_impossible_misses_the_bar():
    net = P.ProbeNet((2, 2), widths=(8, 8, 8))
    x, y = _test_set()
    *_, acc, steps, met = P.fit(net, fake_images, TABLE, jax.random.PRNGKey(0), x, y, max_steps=1, chunk=1)
    assert not met and steps == 1 and acc.min() < 0.99
    xi, yi = _test_set(informative=False)
    bad = lambda k, lab: fake_images(k, lab, informative=False)  # noqa: E731
    *_, acc, _, met = P.fit(net, bad, TABLE, jax.random.PRNGKey(0), xi, yi, max_steps=100)
    assert not met and acc.mean() < 0.8


def test_probe_net_pads_concepts_with_fewer_values():
    net = P.ProbeNet((2, 3), widths=(4, 4, 4))
    params = P.init(net, (H, H, 3), jax.random.PRNGKey(0))
    probe = P.Probe("images", ("a", "b"), (2, 3), net_params=params, widths=(4, 4, 4))
    p = P.predict(probe, np.zeros((5, H, H, 3), np.float32))
    assert p.shape == (5, 2, 3) and np.all(p[:, 0, 2] == 0) and np.allclose(p.sum(-1), 1, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Vector probe (exact)
# --------------------------------------------------------------------------------------------
def _vec_cfg(**kw):
    return dataclasses.replace(C.preset("vec_tiny").data, **kw)


def test_vector_probe_is_exact():
    cfg = _vec_cfg(m=(1.0, 2.0), s=(0.05, 0.1), normalize=False)
    probe = P.probe_for(cfg)
    assert probe.accuracy.min() >= 0.99
    # class means of the unnormalised grid: dim0 in {0, 1}, dim1 in {0, 2}; std 0.05 and 0.1
    x = np.array([[0.0, 0.0, 5.0], [1.0, 2.0, -3.0], [0.1, 1.9, 0.0], [0.6, 0.0, 0.0], [0.98, 1.2, 0.0]], np.float32)
    probs = P.predict(probe, x)
    assert probs.shape == (5, 2, 2) and np.all(probs.sum(-1) == 1)  # every sample has its nearest value
    assert np.array_equal(probs.argmax(-1), [[0, 0], [1, 1], [0, 1], [1, 0], [1, 1]])
    z = P.coordinates(probe, x)
    assert np.allclose(z[:, 0], x[:, 0]) and np.allclose(z[:, 1], x[:, 1] / 2)
    target = np.array([[0, 0], [1, 1], [0, 1], [0, 0], [1, 1]])
    ok = P.correct(probe, x, target)
    assert ok.tolist() == [[True, True], [True, True], [True, True], [False, True], [True, True]]
    # with a 3-std band, far samples have no value: (0.6 is 8 std from 1, 1.2 is 8 std from 2)
    banded = P.correct(dataclasses.replace(probe, band=3.0), x, target)
    assert banded.tolist() == [[True, True], [True, True], [True, True], [False, True], [True, False]]
    # 0.1 from value 0 of dim0 is 2 std: inside a 3-std band, outside a 1-std one
    assert not P.correct(dataclasses.replace(probe, band=1.0), x[2:3], np.array([[0, 1]]))[0, 0]


def test_vector_probe_classifies_by_the_nearest_value_when_bands_overlap():
    """m = 0.2, s = 0.05: a sample at 0.15 lies within 3 s of value 0 but is nearer value 1 (0.2);
    the old band rule counted it as value 0, the nearest-value rule (as the image probe's argmax)
    does not."""
    probe = P.probe_for(_vec_cfg(m=(1.0, 0.2), s=(0.05, 0.05), normalize=False))
    assert 0.95 < probe.accuracy[:, 1].min() < 0.99  # G's own classes overlap (2 std apart)
    x = np.array([[0.0, 0.15, 0.0], [0.0, 0.09, 0.0]], np.float32)
    assert P.correct(probe, x, np.array([[0, 0], [0, 0]]))[:, 1].tolist() == [False, True]
    assert P.correct(probe, x, np.array([[0, 1], [0, 1]]))[:, 1].tolist() == [True, False]


def test_vector_probe_refuses_a_band_too_narrow():
    with pytest.raises(P.ProbeError, match="refuses"):
        P.probe_for(_vec_cfg(), band=1.0)  # only ~68 % of each class lies within 1 std


def test_cache_key_ignores_what_does_not_change_samples():
    d = C.preset("2x2").data
    k = P.cache_key(d)
    assert k == P.cache_key(dataclasses.replace(d, held_out=(0,), n_per_class=7, masked=("size",)))
    assert k != P.cache_key(dataclasses.replace(d, sep_col=0.3))
    v = _vec_cfg()
    assert P.cache_key(v) != P.cache_key(dataclasses.replace(v, s=(0.1, 0.1)))


def test_a_field_added_to_the_data_config_is_in_the_cache_key():
    from jaxconcept.config.checks import section

    @section("data")
    class WithExtra(C.ImageData):
        extra: int = 0

    base = P.cache_key(C.ImageData())
    assert P.cache_key(WithExtra()) != base
    assert P.cache_key(WithExtra(extra=1)) != P.cache_key(WithExtra())


# --------------------------------------------------------------------------------------------
# The real image probe (needs jaxconcept.data.images)
# --------------------------------------------------------------------------------------------
def test_image_probe_for_tiny_config_meets_bar_and_is_cached(monkeypatch, probe_cache):
    monkeypatch.setenv("JAXCONCEPT_CACHE", str(probe_cache))  # trained here, or by an earlier test
    cfg = C.preset("tiny").data
    probe = P.probe_for(cfg)
    assert probe.accuracy.min() >= 0.99
    spec, params = D.spec(cfg), D.params(cfg)
    x, _, y = D.render_all(spec, params, jax.random.PRNGKey(1234), 64)  # fresh, held-out class included
    table = P.class_value_table(spec)
    assert P.correct(probe, x, table[np.asarray(y)]).mean(0).min() >= 0.98
    assert any(probe_cache.rglob("meta.json"))
    again = P.probe_for(cfg)  # from the cache: same predictions
    assert np.allclose(P.predict(again, x[:16]), P.predict(probe, x[:16]), atol=1e-6)


def test_image_probe_undertrained_refuses(tmp_path):
    with pytest.raises(P.ProbeError, match="refuses"):
        P.probe_for(C.preset("tiny").data, max_steps=1, seed=3, cache=tmp_path)
    assert any(tmp_path.glob("*.lock")) and not any(tmp_path.rglob("meta.json"))  # there, and never cached


@pytest.mark.parametrize("bar", [0.0, 1.5, float("nan")])
def test_a_bar_outside_0_1_is_refused_in_one_line(bar):
    with pytest.raises(P.ProbeError, match=r"bar=.* is invalid: allowed a number in \(0, 1\]"):
        P.probe_for(_vec_cfg(), bar=bar)
