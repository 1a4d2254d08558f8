"""Interventions and overprompting (docs/study.md A4), and the vector end-to-end path train -> analyze -> elicit."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import config as C, data as D, vdm, nets
from jaxconcept.elicit import edits as I, prompts as PR
from jaxconcept.cli import main

CFG = C.preset("tiny")
SPEC = D.spec(CFG.data)
NET = nets.build(CFG.model, SPEC)
# zero-initialised output convs make a fresh U-Net ignore its conditioning: perturb every weight
_P = jax.jit(lambda k: vdm.init_params(NET, CFG.model, SPEC, k))(jax.random.PRNGKey(0))
_LEAVES, _TREE = jax.tree.flatten(_P)
PARAMS = jax.tree.unflatten(_TREE, [a + 0.05 * jax.random.normal(jax.random.PRNGKey(i), a.shape)
                                    for i, a in enumerate(_LEAVES)])
X = jax.random.uniform(jax.random.PRNGKey(1), (2, *SPEC.x_shape))
T = jnp.array([0.3, 0.7])
COND = D.prompts(SPEC, D.params(CFG.data))[jnp.array([0, 3])]


def _out(edits):  # jitted: one program, not one per op
    return jax.jit(I.intervene(NET, edits, SPEC), static_argnums=4)(PARAMS["net"], X, T, COND, False,
                                                                   jax.random.PRNGKey(0))


def test_replace_by_itself_and_zero_strength_change_nothing():
    base = jax.jit(vdm.make_apply(NET), static_argnums=4)(PARAMS["net"], X, T, COND, False, jax.random.PRNGKey(0))
    points = I.cond_points(NET, SPEC) + [n for n in nets.tap_names(NET, SPEC) if n.endswith("/out")][:2]
    acts = jax.jit(lambda p: I.capture(NET, p, X, T, COND, points))(PARAMS["net"])
    # separately compiled programs fuse differently: equal to float32 rounding, not bit for bit
    same = _out([I.Edit(p, "replace", value=acts[p]) for p in points])
    np.testing.assert_allclose(np.asarray(same), np.asarray(base), rtol=1e-5, atol=1e-6)
    zero = _out([I.Edit(p, "steer", value=jnp.ones(acts[p].shape[-1]), strength=0.0) for p in points])
    np.testing.assert_allclose(np.asarray(zero), np.asarray(base), rtol=1e-5, atol=1e-6)
    moved = _out([I.Edit(p, "steer", value=jnp.ones(acts[p].shape[-1]), strength=5.0) for p in points])
    assert not np.allclose(np.asarray(moved), np.asarray(base))


def test_vmap_over_strengths_equals_separate_calls_and_works_in_the_sampler():
    cond = jnp.repeat(COND[1:], 3, 0)
    d = D.prompts(SPEC, D.params(CFG.data))

    def run(alpha):
        edits = I.steering_edits(NET, SPEC, PARAMS["net"], d[1], d[3], alpha)
        return vdm.sample(I.intervene(NET, edits), CFG.model, PARAMS, cond, jax.random.PRNGKey(2),
                                x_shape=SPEC.x_shape, n_steps=3)

    alphas = jnp.array([0.0, 1.0, 3.0])
    batched = jax.jit(jax.vmap(run))(alphas)
    for i, a in enumerate(alphas):
        np.testing.assert_allclose(batched[i], jax.jit(run)(a), rtol=1e-5, atol=1e-5)
    plain = vdm.sample(vdm.make_apply(NET), CFG.model, PARAMS, cond, jax.random.PRNGKey(2),
                             x_shape=SPEC.x_shape, n_steps=3)
    np.testing.assert_allclose(batched[0], plain, rtol=1e-5, atol=1e-5)


def test_unknown_point_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid points are .*cond_c"):
        I.intervene(NET, [I.Edit("no/such/point", "add", value=1.0)], SPEC)
    with pytest.raises(ValueError, match="allowed replace"):
        I.intervene(NET, [I.Edit(I.cond_points(NET, SPEC)[0], "twist", value=1.0)], SPEC)


def test_the_reference_class_has_the_pushed_concept_at_value_0():
    sp = D.spec(C.preset("2x2").data)  # classes row-major over (colour, size): 3 = (1, 1)
    assert [PR.reference_class(sp, 3, k) for k in (0, 1)] == [1, 2]
    assert PR.reference_class(sp, 0, 1) == 0
    p = D.params(C.preset("2x2").data)
    np.testing.assert_allclose(PR.overprompts(sp, p, 3, 1, [-1.0])[0], D.prompts(sp, p)[2], atol=1e-6)  # s = -1: it


def test_overprompts_match_the_paper_list():
    sp = D.spec(C.preset("2x2").data)
    p = D.params(C.preset("2x2").data)
    got = np.asarray(PR.overprompts(sp, p, 3, 0, [0.0, 0.5, 1.5, 2.5, 3.5]))[:, 4:7]
    want = [(0.4, 0.4, 0.6), (0.35, 0.35, 0.65), (0.25, 0.25, 0.75), (0.15, 0.15, 0.85), (0.05, 0.05, 0.95)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(np.asarray(PR.overprompts(sp, p, 3, 1, [0.0, 1.0]))[:, 7] <= 0.25 + 1e-6)  # size pushed smaller


def test_vector_end_to_end_train_analyze_elicit(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["train.steps=300", "train.steps_per_call=100", "eval.steps=[100,200,300]", "data.n_per_class=64",
            "model.hidden=[64]", "eval.n_samples=32", "eval.sampler_steps=20", "seeds=[0,1]", "data.s=[0.1,0.1]"]
    args = sum((["--set", s] for s in sets), [])
    assert main(["train", "--preset", "vec2x2", "--no-progress", *args, "--out", str(run)]) == 0
    logged = [ln for ln in capsys.readouterr().err.splitlines() if "differs from the defaults" in ln]
    assert len(logged) == 1 and "train.steps=300" in logged[0] and "seeds=[0, 1]" in logged[0]
    assert main(["analyze", str(run)]) == 0
    assert main(["elicit", str(run)]) == 0
    a = json.loads((run / "analysis.json").read_text())
    e = json.loads((run / "elicit.json").read_text())
    assert len(a["members"]) == 2 and e["steps"] == [100, 200, 300]
    for m in e["members"]:
        assert m["concept"] == "dim0"  # equal signals: the first
        for kind in ("naive", "over", "latent", "latent_comp", "reference_biased"):
            acc = m["accuracy"][kind]
            assert len(acc) == 3 and all(0.0 <= v <= 1.0 for v in acc)
        assert "over_ref" not in m["accuracy"]  # the reference's fixed colours exist for images only
        assert set(m["emergence_minus_turn"]) == set(m["accuracy"])
    assert [r["claim"] for r in e["claims"]] == [3] * 4 and e["run_length"] == 300
    assert 3 in [r["claim"] for r in json.loads((run / "analysis.json").read_text())["claims"]]  # the table gained it
    for fig in ("elicit.png", "elicit_turn.png"):
        assert (run / "figures" / fig).stat().st_size > 1000


def test_target_concept_is_the_weakest_signal():
    from jaxconcept.elicit import measure
    vec = C.override(C.preset("vec2x2"), ["data.normalize=false", "data.m=[1.0,0.3]"])
    assert measure.target_concept(vec, 3) == 1  # dim1: m/s = 6 < 20
    vec = C.override(C.preset("vec2x2"), ["data.normalize=false", "data.m=[0.3,1.0]"])
    assert measure.target_concept(vec, 3) == 0
    assert measure.target_concept(vec, 1) == 1  # class 0-1 differs from 0-0 in dim1 only
    assert measure.target_concept(C.preset("2x2"), 3) == 0  # colour (sep_col 0.2) is weaker than size
    assert measure.target_concept(vec, 3, "dim1") == 1
    with pytest.raises(ValueError, match="allowed dim0, dim1"):
        measure.target_concept(vec, 3, "colour")
