import dataclasses
import json
from pathlib import Path

import pytest

from jaxconcept import config as C
from jaxconcept.cli import main


def test_presets_match_spec():
    c = C.preset("2x2")
    assert (c.data.sep_col, c.data.sep_size, c.data.concepts, c.data.held_out) == (0.2, 0.4, ("colour", "size"), (3,))
    assert (c.train.lr, c.train.weight_decay, c.train.grad_clip, c.train.batch_size, c.train.steps) == (
        1e-3, 0.01, 0.01, 64, 20000)
    c3 = C.preset("2x2x2")
    assert c3.data.concepts == ("colour", "size", "background") and c3.data.values == (2, 2, 2)
    assert C.preset("vec2x2").model.arch == "mlp"


def test_eval_steps_sqrt_spaced():
    steps = C.eval_steps(C.preset("2x2"))
    assert steps[0] == 500 and steps[-1] == 20000 and len(steps) == 60  # the reference's schedule
    # truncated, not rounded, as the reference's (linspace(sqrt(500), sqrt(20000), 60)**2).astype(int)
    assert steps[1] == 594 and steps[2] == 696
    roots = [s ** 0.5 for s in steps]
    gaps = [b - a for a, b in zip(roots, roots[1:])]
    assert max(gaps) - min(gaps) < 0.05 * max(gaps) + 0.1


def test_sweep_expansion_product_and_order():
    c = C.override(C.preset("2x2"), ["data.sep_col=[0.2,0.4,0.6]", "data.sep_size=[0.3,0.4]", "seeds=[0,100]"])
    ms = C.members(c)
    assert len(ms) == 12
    assert [(m.data.sep_col, m.data.sep_size, m.seeds[0]) for m in ms[:3]] == [(0.2, 0.3, 0), (0.2, 0.3, 100), (0.2, 0.4, 0)]
    assert C.swept_fields(c) == ["data.sep_col", "data.sep_size", "seed"]
    v = C.override(C.preset("vec2x2"), ["data.m=[[1,1],[1,3]]"])
    assert [m.data.m for m in C.members(v)] == [(1, 1), (1, 3)]


def test_file_roundtrip_and_preset_key(tmp_path):
    c = C.override(C.preset("2x2x2"), ["data.sep_col=[0.2,0.4]", "train.steps=50"])
    C.save(c, tmp_path / "c.json")
    assert C.load(tmp_path / "c.json") == c
    (tmp_path / "p.json").write_text(json.dumps({"preset": "vec2x2", "train": {"steps": 7}}))
    assert C.load(tmp_path / "p.json").train.steps == 7
    assert C.load(tmp_path / "p.json").data.kind == "vector"


@pytest.mark.parametrize("assignment,field", [
    ("data.sep_col=0.9", "data.sep_col"),
    ("data.sep_col=0", "data.sep_col"),
    ("data.sep_size=[0.2,0.5]", "data.sep_size"),
    ("data.sep_col=\"big\"", "data.sep_col"),
    ("data.bogus=1", "data.bogus"),
    ("bogus.x=1", "bogus"),
    ("train.steps=\"many\"", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("model.dropout=true", "model.dropout"),
    ("data.held_out=[4]", "data.held_out"),
    ("data.held_out=[0,1,2,3]", "data.held_out"),
    ("data.values=[2]", "data.values"),
    ("data.values=[2,1]", "data.values"),
    ("data.concepts=[\"size\",\"colour\"]", "data.concepts"),
    ("data.concepts=[\"smell\"]", "data.concepts"),
    ("model.arch=\"mlp\"", "model.arch"),
    ("model.conditioning=\"film\"", "model.conditioning"),
    ("train.batch_size=7", "train.batch_size"),
    ("train.p_cfg=1.5", "train.p_cfg"),
    ("seeds=[-1]", "seeds"),
    ("seeds=[1,1]", "seeds"),
    ("eval.first=0", "eval.first"),
    ("eval.steps=[5,3]", "eval.steps"),
    ("data.masked=[\"smell\"]", "data.masked"),
    ("train.lr=NaN", "train.lr"),
    ("train.weight_decay=Infinity", "train.weight_decay"),
    ("train.grad_clip=NaN", "train.grad_clip"),
    ("model.init_scale=NaN", "model.init_scale"),
    ("model.gamma_max=Infinity", "model.gamma_max"),
    ("model.data_noise=NaN", "model.data_noise"),
    ("eval.w_cfg=NaN", "eval.w_cfg"),
    ("data.blur_sigma=Infinity", "data.blur_sigma"),
    ("data.pixel_noise=NaN", "data.pixel_noise"),
    ("data.sep_col=NaN", "data.sep_col"),
    ("data.sep_col=[]", "data.sep_col"),
    ("data.sep_size=[]", "data.sep_size"),
    ("seeds=[2147483648]", "seeds"),
    ("seeds=[]", "seeds"),
    ("seeds=[true]", "seeds"),
    ("name=[1]", "name"),
    ("name=3", "name"),
    ("data.values=[true,2]", "data.values"),
    ("data.held_out=[true]", "data.held_out"),
    ("model.ch_mult=[1,true]", "model.ch_mult"),
    ("eval.steps=[true]", "eval.steps"),
    ("train.steps=true", "train.steps"),
    ("train.strategy=\"fast\"", "train.strategy"),
    ("model.conv=\"fft\"", "model.conv"),
    ("train.batches=\"random\"", "train.batches"),
    ("eval.sampler_output=\"x\"", "eval.sampler_output"),
    ("eval.prompts=\"some\"", "eval.prompts"),
    ("eval.vector_band=-1", "eval.vector_band"),
    ("train.memory_budget=-5", "train.memory_budget"),
    ("data.n_per_class=100000000", "data.n_per_class"),
    ("data.concepts=[1]", "data.concepts"),
    ("nonsense", "KEY=VALUE"),
])
def test_invalid_configs_name_the_field(assignment, field):
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
        C.override(C.preset("2x2"), [assignment])


def test_conv_formulation_error_is_one_line_with_the_choices():
    with pytest.raises(C.ConfigError, match=r"^model\.conv='fft' is invalid: allowed one of auto, xla, explicit$"):
        C.override(C.preset("2x2"), ['model.conv="fft"'])
    assert C.preset("2x2").model.conv == "auto" and C.preset("2x2_small").data.image_size == 16


def test_overrides_apply_together():
    c = C.override(C.preset("tiny"), ["model.arch=\"mlp\"", "data.kind=\"vector\""])
    assert (c.model.arch, c.data.kind) == ("mlp", "vector")


def test_vector_validation():
    with pytest.raises(C.ConfigError, match=r"data\.m"):
        C.override(C.preset("vec2x2"), ["data.m=[1,2,3]"])
    for bad in ("data.m=[NaN,1]", "data.s=[1,Infinity]", "data.m=[]", "data.s=[[0.1,0.1],[true,0.1]]"):
        with pytest.raises(C.ConfigError, match=r"data\.[ms]"):
            C.override(C.preset("vec2x2"), [bad])
    with pytest.raises(C.ConfigError, match=r"data\.dim"):  # a space too large to render
        C.override(C.preset("vec2x2"), ["data.dim=40", "data.m=[" + ",".join(["1"] * 40) + "]",
                                        "data.s=[" + ",".join(["1"] * 40) + "]"])
    with pytest.raises(C.ConfigError, match=r"data\.train_classes"):
        C.override(C.preset("vec2x2"), ["data.train_classes=[true]"])
    with pytest.raises(C.ConfigError, match=r"data\.held_out"):
        C.override(C.preset("vec2x2"), ["data.held_out=[4]"])
    with pytest.raises(C.ConfigError, match=r"data\.nuisance"):
        C.override(C.preset("vec2x2"), ["data.nuisance=\"uniform\""])


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["train", "--preset", "tiny", "--set", "data.sep_col=2", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err
    assert "data.sep_col" in err and "Traceback" not in err
    assert main(["train", "--preset", "nope", "--out", "/tmp/never"]) == 2
    assert "preset" in capsys.readouterr().err
    assert main(["config", "--preset", "tiny", "--set", "data.sep_col=[0.2,0.4"]) == 2  # an unclosed list
    err = capsys.readouterr().err.strip()
    assert "data.sep_col=[0.2,0.4 is not valid JSON" in err and len(err.splitlines()) == 1
    assert C.override(C.preset("tiny"), ["name=plain"]).name == "plain"  # other text stays a string


# --------------------------------------------------------------------------------------------
# The same members, probe keys and run configs as before the config rework
# --------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
BEFORE = json.loads((ROOT / "tests" / "fixtures" / "config_members.json").read_text())


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_as_before(new: dict, old: dict, data_cls):
    """Flat dicts equal to the letter (ints stay ints), but for the old flat data section's fields
    of other data kinds, fields retired since (at the value they may still be read with) and
    fields added since (at their defaults)."""
    from jaxconcept.config.files import RETIRED

    for k in sorted(set(old) | set(new)):
        if k not in new and k in RETIRED:
            assert old[k] == RETIRED[k], k
        elif k not in new:
            kinds = [c for c in C.DATA_KINDS.values() if k[5:] in C.field_names(c)]
            assert k.startswith("data.") and kinds and data_cls not in kinds, k  # unused by this kind
        elif k not in old:
            assert (k, new[k]) in {("model.conv", "auto"), ("train.tensorboard", False), ("train.warmup", 0),
                                   ("data.mask_prob", 1.0), ("data.cache_dir", "")}, k
        else:
            assert json.dumps(new[k]) == json.dumps(old[k]), (k, new[k], old[k])


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_members_probe_keys_and_run_configs_as_before(name):
    from jaxconcept.analysis import probe
    from jaxconcept.train import runconfig

    case = BEFORE[name]
    cfg = C.load(ROOT / case["file"]) if "file" in case else C.override(C.preset(case["preset"]), case.get("sets", []))
    ms = C.members(cfg)
    assert len(ms) == len(case["diffs"])
    for m, diff, key in zip(ms, case["diffs"], case["probe"]):
        _same_as_before(_flat(C.to_dict(m)), {**_flat(case["first"]), **diff}, type(m.data))
        assert probe.cache_key(m.data) == key
    assert C.from_dict(case["config"]) == cfg  # the run's old config.json loads to the same config
    assert runconfig.config_diffs(case["config"], cfg) == []  # and resumes


# --------------------------------------------------------------------------------------------
# Declared constraints, data kinds, sweep axes
# --------------------------------------------------------------------------------------------
def test_sweeps_are_axes_apart_from_scalar_fields():
    c = C.override(C.preset("2x2"), ["seeds=[0,100]", "data.sep_size=[0.3,0.4]", "data.sep_col=[0.4,0.6]"])
    assert c.sweep == (("data.sep_col", (0.4, 0.6)), ("data.sep_size", (0.3, 0.4)), ("seeds", (0, 100)))
    assert (c.data.sep_col, c.data.sep_size, c.seed, c.seeds) == (0.4, 0.3, 0, (0, 100))  # member 0's values
    assert C.to_dict(c)["data"]["sep_col"] == [0.4, 0.6] and C.to_dict(c)["seeds"] == [0, 100]
    # axes given in any order are kept in SWEEP_AXES order; one value is just that value
    hand = C.Config(sweep=(("seeds", (0, 100)), ("data.sep_size", (0.3, 0.4)), ("data.sep_col", (0.4, 0.6))))
    assert hand == dataclasses.replace(c, name="") and hash(hand) == hash(dataclasses.replace(c, name=""))
    one = C.Config(sweep=(("data.sep_col", (0.3,)), ("seeds", (5,))))
    assert (one.sweep, one.data.sep_col, one.seed, C.members(one)) == ((), 0.3, 5, [one])
    assert C.sweep_values(C.preset("vec2x2"), "data.sep_col") == [] and C.sweep_values(c, "seeds") == [0, 100]
    with pytest.raises(C.ConfigError, match=r"data\.sep_col does not apply to data\.kind='vector'"):
        C.Config(data=C.VectorData(), model=C.ModelConfig(arch="mlp"), sweep=(("data.sep_col", (0.2, 0.3)),))
    with pytest.raises(C.ConfigError, match=r"data\.sep_col=0\.9 is invalid"):  # every value of an axis is checked
        C.Config(sweep=(("data.sep_col", (0.2, 0.9)),))


def test_configs_are_hashable_static_arguments():
    import jax

    cfg = C.override(C.preset("tiny"), ["data.sep_col=[0.2,0.4]"])
    steps = jax.jit(lambda c, x: x + c.train.steps, static_argnums=0)
    assert int(steps(cfg, 1)) == 21 and int(steps(C.members(cfg)[1], 1)) == 21
    assert len({cfg, C.from_dict(C.to_dict(cfg))}) == 1


def test_data_kinds_are_separate_classes():
    v = C.override(C.preset("tiny"), ['data.kind="vector"', 'model.arch="mlp"', "data.m=[1,2]", "data.dim_nuisance=3"])
    assert isinstance(v.data, C.VectorData) and (v.data.m, v.data.dim_nuisance) == ((1, 2), 3)
    assert (v.data.n_per_class, v.data.held_out) == (32, (3,))  # the fields every kind has carry over
    assert not hasattr(v.data, "sep_col") and C.sweep_settings(v) == {
        "seed": 0, "sep_col": None, "sep_size": None, "m": [1, 2], "s": [0.05, 0.05], "attributes": None,
        "cond_noise": 0.0, "mask_prob": 1.0}
    with pytest.raises(C.ConfigError, match=r"^data\.sep_col does not apply to data\.kind='vector': its fields are .*\bm\b"):
        C.override(C.preset("vec2x2"), ["data.sep_col=0.3"])
    assert C.data_config("celeba", image_size=16) == C.CelebaData(image_size=16)
    with pytest.raises(C.ConfigError, match=r"^train\.lr=-1 is invalid: allowed a finite number > 0$"):
        C.TrainConfig(lr=-1)  # a section alone checks its own fields
    with pytest.raises(C.ConfigError, match=r"^data\.sep_col=2 is invalid"):
        dataclasses.replace(C.preset("2x2").data, sep_col=2)
    with pytest.raises(C.ConfigError, match=r"^unknown config key 'model\.bogus'"):
        C.ModelConfig(bogus=1)


def test_numbers_stay_as_written():
    c = C.override(C.preset("2x2"), ["train.lr=1", "data.blur_sigma=2", "model.gamma_min=-4"])
    assert [type(x) for x in (c.train.lr, c.data.blur_sigma, c.model.gamma_min, c.train.weight_decay)] == [int] * 3 + [float]
