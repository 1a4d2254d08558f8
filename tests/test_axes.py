"""Sweep axes (jaxconcept/config/sweeps.py): any field an axis, refused ones saying why, zipped and
sampled axes, the groups that shape-changing axes make, and the figure of a swept field."""
import json

import numpy as np
import pytest

from jaxconcept import config as C
from jaxconcept.cli import main


def test_any_scalar_setting_is_an_axis_of_one_program():
    c = C.override(C.preset("vec_tiny"), ["train.lr=[1e-3,5e-4]", "train.weight_decay=[0,0.05]", "seeds=[0,1]"])
    ms = C.members(c)
    assert [(m.train.lr, m.train.weight_decay, m.seed) for m in ms[:3]] == [(1e-3, 0, 0), (1e-3, 0, 1), (1e-3, 0.05, 0)]
    assert C.swept_fields(c) == ["train.lr", "train.weight_decay", "seed"] and C.groups(c) == [tuple(range(8))]
    assert (c.train.lr, c.seed) == (1e-3, 0)  # member 0's values
    assert C.to_dict(c)["train"]["lr"] == [1e-3, 5e-4] and C.from_dict(C.to_dict(c)) == c
    every = ["model.dropout=[0,0.2]", "model.init_scale=[1,0.1]", "model.gamma_min=[-5,-6]", "train.grad_clip=[0.01,1]",
             "train.ema=[0,0.9]", "train.p_cfg=[0,0.1]", "train.warmup=[0,10]", "eval.w_cfg=[1,3]",
             "data.cond_noise=[0,0.1]"]
    big = C.override(C.preset("vec_tiny"), every)
    assert len(C.members(big)) == 2 ** len(every) and len(C.groups(big)) == 1
    assert C.member_values(big, C.members(big)[-1])["eval.w_cfg"] == 3
    # data fields sweep in data-kind order, before model, train and eval; seeds innermost
    order = C.override(C.preset("vec_tiny"), ["seeds=[0,1]", "train.lr=[1e-3,2e-3]", "data.m=[[1,1],[1,2]]"])
    assert [a for a, _ in order.sweep] == ["data.m", "train.lr", "seeds"]


@pytest.mark.parametrize("field", sorted(C.REFUSED))
def test_fields_that_cannot_be_axes_are_refused_saying_why(field):
    base = C.preset("tiny") if field not in ("data.dim", "data.perdim", "data.train_classes") else C.preset("vec_tiny")
    sec, name = field.split(".")
    value = getattr(getattr(base, sec), name)
    values = [value, value] if not isinstance(value, tuple) else [list(value), list(value)]
    words = rf"^{field.replace('.', r'[.]')} cannot be a sweep axis: .+; give it one value$"
    with pytest.raises(C.ConfigError, match=words):
        C.override(base, [f"{field}={json.dumps(values)}"])


def test_refusals_and_bad_axes_are_one_line_on_the_command_line(capsys):
    for sets, words in ((["train.steps=[10,20]"], "train.steps cannot be a sweep axis: it is the run's schedule"),
                        (["train.lr=[]"], "train.lr=[] is invalid: allowed a value or a non-empty list"),
                        (['train.lr={"normal":[0,1]}'], 'allowed a sampled axis {"uniform": [lo, hi]}'),
                        (['train.lr={"log_uniform":[1e-4,1e-2]}'], "sweep.n=0 is invalid"),
                        (["sweep.n=3"], "sweep.n=3 is invalid: allowed 0 when no field is sampled"),
                        (["model.gamma_min=[-5,-6]", "model.gamma_max=[10,9,8]", 'sweep.zip=[["model.gamma_min",'
                          '"model.gamma_max"]]'], "fields with as many values each, got model.gamma_min 2, "
                                                 "model.gamma_max 3"),
                        (["train.lr=[1e-3,-1]"], "train.lr=-1 is invalid: allowed a finite number > 0")):
        assert main(["train", "--preset", "vec_tiny", *[a for s in sets for a in ("--set", s)],
                     "--out", "/tmp/never"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_zipped_axes_take_their_values_together():
    c = C.override(C.preset("vec_tiny"), ["model.gamma_min=[-5,-14]", "model.gamma_max=[10,19]", "seeds=[0,1]",
                                          'sweep.zip=[["model.gamma_max","model.gamma_min"]]'])
    assert c.zipped == (("model.gamma_min", "model.gamma_max"),)
    assert [(m.model.gamma_min, m.model.gamma_max, m.seed) for m in C.members(c)] == [
        (-5, 10, 0), (-5, 10, 1), (-14, 19, 0), (-14, 19, 1)]
    assert C.to_dict(c)["sweep"]["zip"] == [["model.gamma_min", "model.gamma_max"]] and C.from_dict(C.to_dict(c)) == c
    with pytest.raises(C.ConfigError, match=r"model\.gamma_max=10 is invalid: allowed a number > model\.gamma_min=12"):
        C.override(c, ["model.gamma_min=[-5,12]", "model.gamma_max=[10,19]", "sweep.zip=[]"])  # the grid's (12, 10)


def test_sampled_axis_gives_the_same_members_for_the_same_seed():
    sets = ['train.lr={"log_uniform":[1e-4,1e-2]}', "sweep.n=6"]
    a, b = C.override(C.preset("vec_tiny"), sets), C.override(C.preset("vec_tiny"), sets)
    lrs = [m.train.lr for m in C.members(a)]
    assert lrs == [m.train.lr for m in C.members(b)] == [m.train.lr for m in C.members(C.from_dict(C.to_dict(a)))]
    assert len(set(lrs)) == 6 and all(1e-4 <= v < 1e-2 for v in lrs) and a.train.lr == lrs[0]
    assert C.to_dict(a)["train"]["lr"] == {"log_uniform": [1e-4, 1e-2]} and C.to_dict(a)["sweep"]["n"] == 6
    other = [m.train.lr for m in C.members(C.override(a, ["sweep.seed=1"]))]
    assert other != lrs and all(1e-4 <= v < 1e-2 for v in other)
    # log-uniform: 2000 draws spread evenly over log10 lr (quarters of the range within 2.5 points of 25 %)
    many = C.override(a, ["sweep.n=2000"])
    logs = np.log10([m.train.lr for m in C.members(many)])
    assert np.all(np.abs(np.histogram(logs, 4, (-4, -2))[0] / 2000 - 0.25) < 0.025)
    # adding a field leaves the others' draws; integer fields draw integers; choice picks listed values; seeds cross
    mixed = C.override(a, ['train.warmup={"uniform":[0,3]}', 'eval.w_cfg={"choice":[1,3]}', "seeds=[5,6]"])
    ms = C.members(mixed)
    assert len(ms) == 12 and [m.train.lr for m in ms[::2]] == lrs and [m.seed for m in ms[:2]] == [5, 6]
    assert {m.train.warmup for m in ms} <= {0, 1, 2, 3} and all(type(m.train.warmup) is int for m in ms)
    assert {m.eval.w_cfg for m in ms} == {1, 3}
    with pytest.raises(C.ConfigError, match=r"train\.lr is both a list and a sampled axis"):
        C.Config(sweep=(("train.lr", (1e-3, 2e-3)),), sampled=(("train.lr", "uniform", (1e-3, 2e-3)),), draws=2)


def test_shape_changing_axes_split_groups_and_per_member_ones_do_not():
    c = C.override(C.preset("tiny"), ["model.ch=[8,16]", "train.lr=[1e-3,2e-3]", "data.sep_col=[0.2,0.4]"])
    ms = C.members(c)
    # data.sep_col sweeps outside model.ch: a group's members need not be neighbours
    assert C.groups(c) == [(0, 1, 4, 5), (2, 3, 6, 7)] and C.group_fields(c) == ["model.ch"]
    assert all(ms[i].model.ch == 8 for i in C.groups(c)[0]) and all(ms[i].model.ch == 16 for i in C.groups(c)[1])
    inner = C.override(C.preset("tiny"), ["train.batch_size=[4,8]", "seeds=[0,1]", "model.dropout=[0,0.1]"])
    assert C.groups(inner) == [(0, 1, 4, 5), (2, 3, 6, 7)]  # batch size splits; dropout and seeds share a program
    search = C.override(C.preset("vec_tiny"), ['train.batch_size={"choice":[16,32]}', "sweep.n=5"])
    sizes = [m.train.batch_size for m in C.members(search)]
    assert sorted(i for g in C.groups(search) for i in g) == list(range(5))
    assert all(len({sizes[i] for i in g}) == 1 for g in C.groups(search)) and len(C.groups(search)) == len(set(sizes))


def _analysis():
    """An analysis of a 2 (lr) x 2 (sep_col) x 2 (init_scale) x 2 (seed) sweep, made up."""
    members = []
    for i, (lr, sep, scale, seed) in enumerate((lr, sep, scale, seed) for lr in (1e-4, 1e-2) for sep in (0.2, 0.6)
                                                for scale in (1, 0.1) for seed in (0, 1)):
        t = None if lr == 1e-4 and sep == 0.2 else 1000 * sep / lr ** 0.1
        members.append({"index": i, "values": {"data.sep_col": sep, "model.init_scale": scale, "train.lr": lr,
                                               "seed": seed},
                        "learning_time": {"blue-small": {"joint": t}}})
    return {"swept": ["data.sep_col", "model.init_scale", "train.lr", "seed"], "members": members,
            "class_names": ["red-large", "red-small", "blue-large", "blue-small"], "held_out": [3],
            "steps": [100, 2000], "threshold": 0.8}


def test_sweep_figure_plots_learning_time_against_a_swept_field(tmp_path):
    from matplotlib.image import imread

    from jaxconcept.analysis import plots

    a = _analysis()
    assert plots.sweep_axes(a) == ("model.init_scale", "data.sep_col", ["train.lr"])
    assert plots.sweep_axes(a, by="train.lr", colour="model.init_scale") == ("train.lr", "model.init_scale",
                                                                            ["data.sep_col"])
    assert plots.sweep_axes(a, colour="seeds")[1] == "seed"  # the config's name of the axis
    with pytest.raises(ValueError, match=r"--by='train\.steps': not a swept field of this run; allowed data\.sep_col"):
        plots.sweep_axes(a, by="train.steps")
    one = plots.sweep_figure(a, tmp_path / "one.png", by="train.lr", colour="data.sep_col")
    two = plots.sweep_figure(a, tmp_path / "two.png", by="data.sep_col", colour="seed")
    img1, img2 = imread(str(one)), imread(str(two))
    assert img1.shape[1] > 1.5 * img1.shape[0] and img1.shape != img2.shape  # two panels (init_scale 1, 0.1), then four
    assert np.asarray(img1).std() > 0.05
