"""Every experiments/ config validates, and runs a few steps scaled down, so none can rot."""
import json
from pathlib import Path

import numpy as np
import pytest

from jaxconcept import config as C, rundir
from jaxconcept.train import loop

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.json"))

SHRINK_IMAGES = ["model.ch=4", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.num_heads=1",
                 "model.norm_groups=2", "model.time_embed_dim=8", "model.embed_dim=8", "data.image_size=8"]
SHRINK_VECTOR = ["model.hidden=[32]", "model.time_embed_dim=16", "model.embed_dim=32"]
SHRINK = ["data.n_per_class=4", "train.steps=2", "train.steps_per_call=2", "train.batch_size=2",
          "eval.steps=[2]", "eval.n_samples=1", "eval.sampler_steps=1", "eval.val_batches=1"]


def shrunk(cfg: C.Config) -> C.Config:
    """The same experiment's first member with a tiny network and budget (sweep expansion is tested
    in test_config, test_axes and test_sweep; a one-device run compiles faster than a sharded sweep)."""
    sets = list(SHRINK) + (SHRINK_VECTOR if cfg.data.kind == "vector" else SHRINK_IMAGES)
    return C.override(C.members(cfg)[0], sets)


def test_there_are_experiments():
    names = {p.stem for p in EXPERIMENTS}
    assert {"colour_sweep", "size_sweep", "grid", "cfg", "2x2x2", "hidden_capabilities"} <= names


@pytest.fixture(scope="module")
def celeb_a(tmp_path_factory):
    """No CelebA here: a generated celeb_a in its files and attributes, prepared by TFDS's builder."""
    from celeba_fake import write_tfds_celeb_a

    return write_tfds_celeb_a(tmp_path_factory.mktemp("tfds"), n=200)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_validates_and_runs(path, tmp_path, monkeypatch, request):
    full = C.load(path)
    assert len(C.members(full)) >= 1 and C.eval_steps(full)
    cfg = shrunk(full)
    if cfg.data.kind == "celeba":  # a generated celeb_a with the same attributes
        monkeypatch.setenv("JAXCONCEPT_DATA_CACHE", str(tmp_path / "cache"))
        cfg = C.override(cfg, [f"data.data_dir={json.dumps(str(request.getfixturevalue('celeb_a')))}"])
    sw, state = loop.train(cfg, tmp_path / "run", progress=False)
    s = rundir.load_samples(tmp_path / "run", 2)["samples"]
    assert s.shape[:3] == (sw.size, sw.spec.n_classes, 1) and np.isfinite(s).all()
