"""The demo's two claims (README, "What the demo shows"), checked by running a third of it:
the m1 = 0.25 members (3 seeds) at the demo's full training budget."""
import json

import numpy as np

from jaxconcept import demo


def test_demo_memorises_then_turns_and_overprompting_comes_first(tmp_path):
    out = tmp_path / "demo"
    demo.run(out, progress=False, extra_sets=["data.m=[1,0.25]", "eval.n_points=24"])
    analysis = json.loads((out / "analysis.json").read_text())
    elicit = json.loads((out / "elicit.json").read_text())
    held = analysis["class_names"][analysis["held_out"][0]]
    assert held == "1-1" and len(analysis["members"]) == 3
    for m in analysis["members"]:
        xy = np.array(m["coords"][held])  # [T, 2]: (concept 0, concept 1) coordinates
        corner = np.rint(np.clip(xy, 0, 1)) @ [2, 1]  # nearest corner: 0-0, 0-1, 1-0, 1-1 -> 0, 1, 2, 3
        assert corner[-1] == 3, xy  # it ends nearest to its own corner (1, 1) ...
        memorise = np.flatnonzero(corner == 2)  # ... after passing nearest to the training corner (1, 0)
        assert memorise.size and memorise[0] < np.flatnonzero(corner == 3)[0], xy
        assert m["learning_time"][held]["joint"] is not None  # and it is generalised within the budget
    inf = float("inf")
    ahead = []
    for m in elicit["members"]:
        assert m["concept"] == "dim1"  # the weaker signal is the one pushed
        e = {k: (inf if v is None else v) for k, v in m["emergence_step"].items()}
        assert e["over"] < inf
        ahead.append(e["naive"] - e["over"])
    assert sum(a > 0 for a in ahead) >= 2 and np.mean(ahead) > 0, ahead
