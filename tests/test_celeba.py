"""CelebA-kind data (jaxconcept/data/celeba.py, celeba_source.py, augment.py) on a small generated
celeb_a in CelebA's own files, prepared by TFDS's real builder from its manual directory
(tests/celeba_fake.py: each attribute a coloured band, readable back from any image): selection,
balance, held-out combinations, the host feed and its batch order, augmentation, the stacked
engine, the attribute probe, analyze + elicit through the CLI, and the missing-data messages."""
import colorsys
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import celeba_fake as F
from jaxconcept import cli, config as C, data as D, rundir
from jaxconcept.train import loop, plan, stack
from jaxconcept.elicit import prompts as PR
from jaxconcept.analysis import probe as P
from jaxconcept.train.step import draw_batch, member_keys
from jaxconcept.data import augment, celeba, celeba_source


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A TFDS data directory with celeb_a prepared (array_record) from generated CelebA files in its
    manual directory; the data and probe caches in temporary directories."""
    root = tmp_path_factory.mktemp("celeba")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXCONCEPT_DATA_CACHE", str(root / "cache"))
    mp.setenv("JAXCONCEPT_CACHE", str(root / "probes"))
    yield F.write_tfds_celeb_a(root / "tfds")
    mp.undo()


def cfg_for(folder, *sets) -> C.Config:
    return C.override(C.preset("celeba_tiny"), [f"data.data_dir={json.dumps(str(folder))}", *sets])


def feed_for(spec, members):
    return D.host_feed(spec, members, stack.train_keys(members))


def test_spec_prompts_and_a_sweep_over_attribute_pairs(folder):
    cfg = cfg_for(folder, 'data.attributes=[["Male","Smiling"],["Black_Hair","Eyeglasses"]]', "seeds=[0,1]")
    sp = D.spec(cfg.data)  # a sweep config: its first attribute list names the concepts
    assert sp.kind == "celeba" and sp.x_shape == (16, 16, 3) and sp.cond_dim == 4 and sp.n_classes == 4
    assert sp.concepts == ("Male", "Smiling") and sp.values == (2, 2) and sp.held_out == (1,)
    assert sp.class_names[1] == "not_Male-Smiling" and sp.train_classes == (0, 2, 3)
    assert sp.n_train + sp.n_val == cfg.data.n_per_class and sp.n_test == 8
    ms = C.members(cfg)
    assert [D.spec(m.data).concepts for m in ms] == [("Male", "Smiling")] * 2 + [("Black_Hair", "Eyeglasses")] * 2
    np.testing.assert_array_equal(D.prompts(sp, D.params(cfg.data)),
                                  [[1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1]])  # one-hot per attribute
    np.testing.assert_array_equal(D.null_cond(sp), -np.ones(4))
    np.testing.assert_array_equal(D.eval_prompts(sp, D.params(cfg.data), jax.random.PRNGKey(0), 3)[1],
                                  [[1, 0, 0, 1]] * 3)
    # overprompting pushes the pushed attribute's one-hot beyond 1 / 0, leaving the other alone
    np.testing.assert_allclose(PR.overprompts(sp, D.params(cfg.data), 1, 1, [0.0, 0.5, 2.0]),
                               [[1, 0, 0, 1], [1, 0, -0.5, 1.5], [1, 0, -2, 3]])


def test_selection_is_balanced_holds_out_and_shows_the_chosen_attributes(folder):
    for attrs, held in ((["Male", "Smiling"], 1), (["Black_Hair", "Eyeglasses"], 3)):
        cfg = cfg_for(folder, f"data.attributes={json.dumps(attrs)}", f"data.held_out=[{held}]")
        sp, d = D.spec(cfg.data), celeba.load(cfg.data)
        cols = [F.ATTRS.index(a) for a in attrs]
        for part, classes, n in (("train", sp.train_classes, sp.n_train), ("val", sp.train_classes, sp.n_val),
                                 ("test", sp.held_out, sp.n_test)):
            x, y = np.asarray(d[f"x_{part}"]), d[f"y_{part}"]
            assert x.shape == (len(classes) * n, 16, 16, 3) and x.dtype == np.uint8 and np.ptp(x) > 100
            assert list(np.unique(y)) == list(classes)
            assert (np.bincount(y, minlength=4)[list(classes)] == n).all()  # balanced
            np.testing.assert_array_equal(celeba.class_labels(F.decode(x)[:, cols]), y)  # the images show them
        idx = celeba.index(cfg.data)
        sel = celeba.select(idx, cfg.data)
        used = np.concatenate([p for p, _ in sel.values()])
        probe = celeba.select_probe(idx, cfg.data)
        held_pos = np.concatenate([p for p, _ in probe.values()])
        assert len(set(used.tolist())) == len(used) and not set(used.tolist()) & set(held_pos.tolist())
        assert set(probe["train"][1]) == set(probe["test"][1]) == {0, 1, 2, 3}  # the probe sees every combination
        assert (idx.partition[probe["test"][0]] == 2).all()  # tested on the test partition
    with pytest.raises(celeba.DataError, match="'Smilling' not among the attributes.*allowed 5_o_.*Male, .*Smiling"):
        celeba.load(cfg_for(folder, 'data.attributes=["Male","Smilling"]').data)
    with pytest.raises(celeba.DataError, match="data.n_per_class=500: the combination .* has only 100 images"):
        celeba.load(cfg_for(folder, "data.n_per_class=500").data)


def test_crop_is_centred_and_resized():
    arr = np.random.default_rng(0).integers(0, 256, (50, 30, 3), dtype=np.uint8)  # 30 wide, 50 high
    img = Image.fromarray(arr)
    np.testing.assert_array_equal(celeba_source.preprocess(img, 0, 30), arr[10:40])  # the largest centred square
    np.testing.assert_array_equal(celeba_source.preprocess(img, 20, 20), arr[15:35, 5:25])
    small = celeba_source.preprocess(img, 0, 10)
    assert small.shape == (10, 10, 3) and small.dtype == np.uint8
    assert abs(small.astype(float).mean() - arr[10:40].astype(float).mean()) < 3


def test_feed_reads_epochs_without_replacement_resumes_and_never_shows_the_held_out(folder):
    cfg = cfg_for(folder, "seeds=[0,1]")
    ms, sp = C.members(cfg), D.spec(cfg.data)
    n, b = 3 * sp.n_train, cfg.train.batch_size
    per_epoch = -(-n // b)
    k = 2 * per_epoch + 3  # more than two epochs
    out = feed_for(sp, ms)(0, k)
    assert out["x"].shape == (2, k, b, 16, 16, 3) and out["x"].dtype == np.uint8
    assert out["c"].shape == (2, k, b, 4) and out["c"].dtype == np.float32 and out["n"].dtype == np.int32
    last = n - (per_epoch - 1) * b
    np.testing.assert_array_equal(out["n"][0], ([b] * (per_epoch - 1) + [last]) * 2 + [b] * 3)
    table = np.asarray(D.prompts(sp, D.params(cfg.data)))
    cls = celeba.class_labels(F.decode(out["x"])[..., :2])  # [2, k, b]: what every image shows
    assert not (cls == 1).any()  # the held-out combination reaches no batch, padding included
    np.testing.assert_array_equal(out["c"], table[cls])  # each image with its own prompt
    x_train = np.asarray(celeba.load(cfg.data)["x_train"])
    for i in range(2):
        for e in range(2):  # every training image exactly once per epoch
            rows = np.concatenate([out["x"][i, e * per_epoch + j, : out["n"][i, e * per_epoch + j]]
                                   for j in range(per_epoch)])
            assert sorted(r.tobytes() for r in rows) == sorted(r.tobytes() for r in x_train)
    assert not np.array_equal(out["x"][0, 0], out["x"][1, 0])  # members shuffle by their own seeds
    again = feed_for(sp, ms)  # a resumed run sees the same batches, with or without prefetching
    for step in (per_epoch + 1, per_epoch + 2, per_epoch + 3):
        got = again(step, 1)
        for key in ("x", "c", "n"):
            np.testing.assert_array_equal(got[key][:, 0], out[key][:, step])


def test_feed_and_held_back_sets_of_a_padded_sweep_and_batches_with_replacement(folder):
    sw = plan.build(cfg_for(folder, "seeds=[0,1,2]"), jax.devices()[:2])  # 3 members padded to 4
    assert len(sw.padded) == 4
    out = feed_for(sw.spec, sw.padded)(5, 2)
    assert out["x"].shape[:2] == (4, 2)
    for key in ("x", "c", "n"):  # the inert copy gets the last member's batches
        np.testing.assert_array_equal(out[key][3], out[key][2])
    held = D.host_eval_data(sw.spec, sw.padded)
    assert held["x_val"].shape == (4, 3 * sw.spec.n_val, 16, 16, 3) and held["x_val"].dtype == np.uint8
    assert held["x_test"].shape == (4, sw.spec.n_test, 16, 16, 3)
    np.testing.assert_array_equal(held["c_test"], np.broadcast_to([1, 0, 0, 1], (4, 8, 4)))
    rep = feed_for(sw.spec, C.members(cfg_for(folder, 'train.batches="replacement"')))(0, 20)
    assert (rep["n"] == 8).all() and not (celeba.class_labels(F.decode(rep["x"])[..., :2]) == 1).any()


def test_train_view_converts_flips_and_jitters_on_device(folder):
    cfg = cfg_for(folder)
    sp = D.spec(cfg.data)
    x = np.asarray(celeba.load(cfg.data)["x_train"][:24])
    plain = x.astype(np.float32) / 255.0
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a: D.train_view(sp, a, None))(jnp.asarray(x))), plain,
                               rtol=1e-6)  # key=None: the conversion only
    no_jitter = D.spec(cfg_for(folder, "data.jitter=0").data)
    flips = np.asarray(D.train_view(no_jitter, jnp.asarray(x), jax.random.PRNGKey(0)))
    flipped = [np.allclose(f, p[:, ::-1], rtol=1e-6) for f, p in zip(flips, plain)]
    kept = [np.allclose(f, p, rtol=1e-6) for f, p in zip(flips, plain)]
    assert all(a or b for a, b in zip(flipped, kept)) and any(flipped) and any(kept)
    view = jax.jit(lambda a, k: D.train_view(sp, a, k))
    grey = np.full((16, 16, 16, 3), 128, np.uint8)  # only brightness can move a grey image: by at most 10 %
    g = np.asarray(view(jnp.asarray(grey), jax.random.PRNGKey(1)))
    assert np.ptp(g, axis=(1, 2, 3)).max() < 1e-6 and np.ptp(g[:, 0, 0, 0]) > 0.01
    assert (np.abs(g - 128 / 255) <= 0.1 * 128 / 255 + 1e-6).all()
    j = np.asarray(view(jnp.asarray(x), jax.random.PRNGKey(2)))
    assert j.min() >= 0 and j.max() <= 1
    near = np.minimum(np.abs(j - plain).mean(axis=(1, 2, 3)), np.abs(j - plain[:, :, ::-1]).mean(axis=(1, 2, 3)))
    assert (near > 1e-3).all() and (near < 0.15).all()  # every image changed, none beyond mild jitter
    rgb = np.concatenate([np.random.default_rng(0).uniform(size=(300, 3)), np.eye(3), [[0.5, 0.5, 0.5], [0, 0, 0]]])
    hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(rgb, jnp.float32)))
    np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb], atol=1e-5)
    np.testing.assert_allclose(np.asarray(augment.hsv_to_rgb(jnp.asarray(hsv))), rgb, atol=1e-5)


def test_the_cache_is_reused_whole_and_keyed_by_what_changes_it(folder, monkeypatch):
    cfg = cfg_for(folder)
    first = celeba.load(cfg.data)
    assert celeba.load(cfg.data) is first  # members with one data config share the arrays
    monkeypatch.setattr(celeba, "_LOADED", {})  # as a new process
    monkeypatch.setattr(celeba, "_build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    np.testing.assert_array_equal(np.asarray(celeba.load(cfg.data)["x_train"]), np.asarray(first["x_train"]))
    assert not list(celeba.cache_dir().glob(".tmp-*"))
    with pytest.raises(AssertionError, match="rebuilt"):
        celeba.load(cfg_for(folder, "data.crop=40").data)


def test_data_cache_dir_puts_the_cache_there(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(celeba, "_LOADED", {})
    celeba.load(cfg_for(folder, f"data.cache_dir={json.dumps(str(tmp_path))}").data)
    assert [p.name.split("-")[0] for p in tmp_path.glob("*/meta.json") for p in [p.parent]] == ["data"]


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """Two seeds trained as one stacked state from the host feed, evaluated twice."""
    cfg = cfg_for(folder, "seeds=[0,1]", "train.steps=4", "eval.steps=[2,4]", "eval.sampler_steps=2")
    run_dir = tmp_path_factory.mktemp("celeba_run") / "run"
    sw, state = loop.train(cfg, run_dir, progress=False)
    return cfg, sw, run_dir


def test_the_stacked_engine_trains_two_seeds_from_the_host_feed(run):
    cfg, sw, run_dir = run
    assert sw.host_fed and sw.size == 2
    s = rundir.load_samples(run_dir, 4)
    assert s["samples"].shape == (2, 4, cfg.eval.n_samples, 16, 16, 3) and np.isfinite(s["samples"]).all()
    metrics = rundir.load_metrics(run_dir)
    assert [r["step"] for r in metrics] == [2, 4]
    for k in ("train_loss", "val_loss", "test_loss"):
        assert all(np.isfinite(r[k]).all() and len(r[k]) == 2 for r in metrics)
    assert metrics[0]["train_loss"][0] != metrics[0]["train_loss"][1]  # different seeds, different batches
    members = json.loads((run_dir / "members.json").read_text())
    assert [m["attributes"] for m in members] == [["Male", "Smiling"]] * 2
    assert all(v > 0 for v in members[0]["signal"].values())


def test_the_attribute_probe_learns_every_combination_and_is_cached(folder, run, monkeypatch):
    cfg = run[0]
    probe = P.probe_for(cfg.data)
    assert probe.kind == "celeba" and probe.accuracy.shape == (4, 2)
    assert (probe.concept_accuracy >= P.CELEBA_BAR).all()
    pd = celeba.probe_data(cfg.data)
    x = np.asarray(pd["x_test"], np.float32) / 255.0
    assert P.correct(probe, x, P.class_value_table(D.spec(cfg.data))[pd["y_test"]]).mean() >= P.CELEBA_BAR
    monkeypatch.setattr(P, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    np.testing.assert_array_equal(P.predict(P.probe_for(cfg.data), x), P.predict(probe, x))  # from the cache
    weak = np.array([[0.99, 0.9], [0.99, 0.6], [0.99, 0.8], [0.99, 0.9]])  # Smiling: 0.8 on average
    monkeypatch.setattr(P, "fit", lambda *a, **k: (probe.net_params, weak, 7, False))
    with pytest.raises(P.ProbeError, match=r"only 0.800 accuracy on 'Smiling' \(bar 0.85; .*not_Male-Smiling 0.60"):
        P.probe_for(cfg.data, use_cache=False)


def test_analyze_and_elicit_run_end_to_end_through_the_cli(run, capsys):
    _, _, run_dir = run
    assert cli.main(["analyze", str(run_dir)]) == 0
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert analysis["kind"] == "celeba" and analysis["concepts"] == ["Male", "Smiling"]
    assert analysis["held_out"] == [1] and len(analysis["members"]) == 2
    assert (run_dir / "figures" / "trajectories.png").exists()
    assert cli.main(["elicit", str(run_dir)]) == 0
    out = json.loads((run_dir / "elicit.json").read_text())
    # the held-out (not Male, Smiling) differs from class 0 in Smiling only: that is what is pushed
    assert [m["concept"] for m in out["members"]] == ["Smiling", "Smiling"]
    assert all(len(m["accuracy"]["over"]) == 2 for m in out["members"])
    assert "Traceback" not in capsys.readouterr().err


def test_celeb_a_is_read_through_tfds(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCONCEPT_DATA_CACHE", str(tmp_path / "cache"))
    cfg = C.override(C.preset("celeba_tiny"), [f"data.data_dir={json.dumps(str(folder))}", "data.n_per_class=12",
                                               "data.n_test=4"])
    assert cfg.data.source == "celeb_a"
    d = celeba.load(cfg.data)
    sp = D.spec(cfg.data)
    assert d["x_train"].shape == (3 * sp.n_train, 16, 16, 3) and d["x_test"].shape == (4, 16, 16, 3)
    for part in ("train", "val", "test"):  # 218x178 faces, centre-cropped and resized, attributes intact
        np.testing.assert_array_equal(celeba.class_labels(F.decode(d[f"x_{part}"])[:, :2]), d[f"y_{part}"])
    idx = celeba.index(cfg.data)
    assert len(idx.names) == 40 and set(idx.partition.tolist()) == {0, 1, 2}
    probe = celeba.probe_data(cfg.data)
    np.testing.assert_array_equal(celeba.class_labels(F.decode(probe["x_test"])[:, :2]), probe["y_test"])


def test_a_host_fed_member_sees_the_batches_an_on_device_member_would(folder):
    for batches in ("epochs", "replacement"):
        cfg = cfg_for(folder, "seeds=[0,1]", f"train.batches={json.dumps(batches)}")
        ms, sp = C.members(cfg), D.spec(cfg.data)
        d = celeba.load(cfg.data)
        prompts = D.prompts(sp, D.params(cfg.data))
        on_device = {"x_train": jnp.asarray(np.asarray(d["x_train"])), "c_train": prompts[jnp.asarray(d["y_train"])]}
        draw = jax.jit(draw_batch, static_argnums=0)
        n = len(d["y_train"])
        got = feed_for(sp, ms)(3, 2 * -(-n // cfg.train.batch_size))  # across an epoch's end
        for i, m in enumerate(ms):
            key = member_keys(m.seeds[0])["train"]
            for j in range(got["x"].shape[1]):
                x, c, n_valid = draw(cfg.train, on_device, key, jnp.int32(3 + j))
                np.testing.assert_array_equal(got["x"][i, j], x)
                np.testing.assert_array_equal(got["c"][i, j], c)
                assert got["n"][i, j] == (cfg.train.batch_size if n_valid is None else n_valid)


@pytest.mark.parametrize("sets, says", [
    (['data.source="no_such_dataset"'], "data.source='no_such_dataset': no TFDS dataset of that name"),
    (["data.data_dir=EMPTY"], ("'celeb_a' is not prepared in EMPTY .* tfds build celeb_a --data_dir EMPTY "
                               "--file_format array_record .*EMPTY/downloads/manual")),
    (["data.data_dir=TFRECORD"], ("'celeb_a' in TFRECORD/celeb_a/2.1.0 is prepared as tfrecord.* needs array_record.*"
                                  "tfds build celeb_a --data_dir TFRECORD --file_format array_record")),
])
def test_missing_data_is_one_clear_message_and_exit_code_2(tmp_path, capsys, sets, says):
    empty = tmp_path / "empty"
    empty.mkdir()
    tfrecord = F.write_tfds_celeb_a(tmp_path / "tfrecord", n=20, file_format="tfrecord") \
        if "TFRECORD" in sets[0] else None
    for name, path in (("EMPTY", empty), ("TFRECORD", tfrecord)):
        sets = [s.replace(name, json.dumps(str(path))) for s in sets]
        says = says.replace(name, re.escape(str(path)))
    args = ["--quiet", "train", "--preset", "celeba_tiny", "--out", str(tmp_path / "run"), "--no-progress"]  # no
    capsys.readouterr()  # progress lines (the stacking strategy is chosen before the data is read)
    assert cli.main(args + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("jaxconcept train: ") and re.search(says, err)


def test_the_core_library_and_a_prepared_cache_need_no_tensorflow(folder):
    """The core library imports, and a data config whose images are cached loads, with TensorFlow and
    TFDS unimportable; an uncached TFDS source then says how to install them."""
    cfg = cfg_for(folder)
    celeba.load(cfg.data)  # cached now
    code = f"""
import sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None  # as if not installed
import numpy as np
from jaxconcept import cli, config as C
from jaxconcept.train import loop, plan, stack, step
from jaxconcept.analysis import probe
from jaxconcept.data import celeba
cfg = C.override(C.preset("celeba_tiny"), ['data.data_dir={json.dumps(str(folder))}'])
assert celeba.load(cfg.data)["x_train"].shape == (114, 16, 16, 3)
try:
    celeba.load(C.override(cfg, ["data.n_per_class=30"]).data)
except celeba.DataError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'jaxconcept[celeba]'" in out.stdout and "cannot be imported" in out.stdout
