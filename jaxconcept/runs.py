"""A run as its readers (analysis, elicitation, plots) see it: ``Run``, and its groups read as one run.

A sweep whose members need programs of their own (``config.groups``) trains each group into
``rundir.group_dir`` (RUN_DIR/groups/<g>/; RUN_DIR itself for a run of one group): its
metrics.jsonl, samples/ and params/ hold the group's members as rows, in member order.
``of_run`` gives each group's directory and members; the functions below read steps, metrics and
samples across groups in the run's member order, so a reader handles one group or many alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from jaxconcept import config as C, data as D, nets, rundir, vdm

PER_MEMBER_METRICS = ("train_loss", "val_loss", "test_loss", "frozen")  # the per-member lists of a metrics record


@dataclass(frozen=True)
class Group:
    """One group of a run: the members trained as one stack."""

    index: int
    dir: object  # where its metrics.jsonl, samples/, params/ and checkpoints/ are
    members: tuple  # the run's member indices: row r of this group's arrays is member members[r]


def of_run(run_dir, cfg: C.Config | None = None) -> list[Group]:
    """The groups of the run in ``run_dir`` (``cfg``: its config, if at hand), in group order.
    Raises rundir.RunDirError: not a run directory."""
    cfg = cfg or rundir.load_config(run_dir)
    gs = C.groups(cfg)
    return [Group(g, rundir.group_dir(run_dir, g, len(gs)), idx) for g, idx in enumerate(gs)]


def locate(groups: list[Group], member: int) -> tuple[Group, int]:
    """(the group holding ``member``, its row there). Raises IndexError for no such member."""
    for g in groups:
        if member in g.members:
            return g, g.members.index(member)
    raise IndexError(f"member {member} is in none of the {len(groups)} group(s)")


def steps_with(run_dir, sub: str = "samples", groups: list[Group] | None = None) -> list[int]:
    """Steps for which every group has RUN_DIR/<group>/<sub>/step_*.npz, increasing (a group
    trained after another has the steps it reached so far)."""
    common = None
    for g in groups or of_run(run_dir):
        have = set(rundir.steps_with(g.dir, sub))
        common = have if common is None else common & have
    return sorted(common or ())


def load_metrics(run_dir, groups: list[Group] | None = None) -> list[dict]:
    """The metrics records of every group as one run's: at the steps every group logged, each
    per-member list (``PER_MEMBER_METRICS``) holds the run's members in member order; the other
    values (e.g. steps_per_s) are group 0's."""
    groups = groups or of_run(run_dir)
    if len(groups) == 1:
        return rundir.load_metrics(groups[0].dir)
    by_group = [{r["step"]: r for r in rundir.load_metrics(g.dir)} for g in groups]
    n = sum(len(g.members) for g in groups)
    out = []
    for step in sorted(set.intersection(*(set(b) for b in by_group))):
        rec = dict(by_group[0][step])
        for key in PER_MEMBER_METRICS:
            if all(key in b[step] for b in by_group):
                merged = [None] * n
                for g, b in zip(groups, by_group):
                    for row, i in enumerate(g.members):
                        merged[i] = b[step][key][row]
                rec[key] = merged
        out.append(rec)
    return out


def member_samples(run_dir, step: int, member: int, groups: list[Group] | None = None) -> np.ndarray:
    """One member's samples at ``step``: [n_classes, n_samples, *x_shape] (its group's file)."""
    g, row = locate(groups or of_run(run_dir), member)
    return rundir.load_samples(g.dir, step)["samples"][row]


class Run:
    """A run directory as its readers (analysis, elicitation) see it, one group or many alike
    (``of_run``): ``config``, ``member_configs``, ``groups`` on opening, the rest when
    asked.

    Raises rundir.RunDirError on opening: not a run directory, or config.json is not a valid config."""

    def __init__(self, run_dir):
        self.dir = rundir.path(run_dir)
        self.config = rundir.load_config(self.dir)
        self.member_configs = C.members(self.config)
        self.groups = of_run(self.dir, self.config)

    def members(self) -> list[dict]:
        """members.json; when it is missing or unreadable, the same records recomputed from the
        config (``rundir.member_records``). Raises rundir.RunDirError: it lists another number of members."""
        try:
            out = rundir.load_members(self.dir)
        except rundir.RunDirError:
            return rundir.member_records(self.config, self.member_configs)
        if len(out) != len(self.member_configs):
            raise rundir.RunDirError(f"{self.dir}: members.json lists {len(out)} members, the config "
                                     f"{len(self.member_configs)}; delete members.json to have it rebuilt")
        return out

    def steps(self, sub: str = "samples") -> list[int]:
        """Steps at which every group has saved ``sub`` ("samples" or "params"), increasing."""
        return steps_with(self.dir, sub, self.groups)

    def metrics(self) -> list[dict]:
        """metrics.jsonl of every group as one run's (``load_metrics``)."""
        return load_metrics(self.dir, self.groups)

    def samples(self, step: int, group) -> np.ndarray:
        """A group's samples at ``step``: [its members, n_classes, n_samples, *x_shape] float32."""
        return rundir.load_samples(group.dir, step)["samples"]

    def member_samples(self, step: int, member: int) -> np.ndarray:
        """One member's samples at ``step``: [n_classes, n_samples, *x_shape]."""
        return member_samples(self.dir, step, member, self.groups)

    def params(self, step: int, group=None) -> dict:
        """A group's stacked parameters [its members, ...] (numpy) saved at evaluation ``step``
        (``group``: one of ``groups``; may be left out in a run of one group).
        Raises rundir.RunDirError: missing, damaged or of another model, or no group named in a run of several."""
        if group is None and len(self.groups) > 1:
            raise rundir.RunDirError(f"{self.dir} is a sweep of {len(self.groups)} groups, each with its own parameters: "
                                     "read them one group at a time (Run.groups)")
        group = group or self.groups[0]
        first = self.member_configs[group.members[0]]
        spec = D.spec(first.data)
        net = nets.build(first.model, spec)
        like = jax.eval_shape(lambda k: vdm.init_params(net, first.model, spec, k), jax.random.PRNGKey(0))
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(group.members), *a.shape), a.dtype), like)
        return rundir.load_params(group.dir, step, like)

    def output(self, name: str) -> dict | None:
        """RUN_DIR/<name> ("analysis.json", "elicit.json") when it exists, else None."""
        p = self.dir / name
        if not p.exists():
            return None
        out = rundir.read_json(p, f"written by `jaxconcept {name.split('.')[0].replace('analysis', 'analyze')}`; run it again")
        return out if isinstance(out, dict) else None
