"""The on-disk layout of a run directory, shared by training, analysis and elicitation.

    RUN_DIR/config.json           the full resolved (sweep) config
    RUN_DIR/members.json          one entry per member: index, seed, its sweep values, signals
    RUN_DIR/metrics.jsonl         one JSON object per log point: step, train_loss[M], val_loss[M],
                                  frozen[M], steps_per_s
    RUN_DIR/samples/step_XXXXXXX.npz
                                  samples [M, n_classes, n_samples, *x_shape] (float16),
                                  prompts [M, n_classes, cond_dim] (float32), step
    RUN_DIR/params/step_XXXXXXX.npz
                                  stacked parameters (leading member axis) at each evaluation point
    RUN_DIR/checkpoints/          orbax train-state checkpoints (resume)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxconcept import config as C


class RunDirError(ValueError):
    pass


def _step_file(run_dir, sub, step):
    return Path(run_dir) / sub / f"step_{int(step):07d}.npz"


def load_config(run_dir) -> C.Config:
    p = Path(run_dir) / "config.json"
    if not p.exists():
        raise RunDirError(f"{run_dir} is not a run directory: no config.json (run `jaxconcept train` first)")
    return C.from_dict(json.loads(p.read_text()))


def load_members(run_dir) -> list[dict]:
    return json.loads((Path(run_dir) / "members.json").read_text())


def load_metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def steps_with(run_dir, sub="samples") -> list[int]:
    """Steps for which RUN_DIR/<sub>/step_*.npz exists, increasing."""
    d = Path(run_dir) / sub
    if not d.exists():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in d.glob("step_*.npz"))


def save_samples(run_dir, step, samples, prompts) -> None:
    p = _step_file(run_dir, "samples", step)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp.npz")
    np.savez(tmp, samples=np.asarray(samples, np.float16), prompts=np.asarray(prompts, np.float32), step=step)
    tmp.replace(p)  # atomic: a killed run never leaves half a file under the final name


def load_samples(run_dir, step) -> dict:
    with np.load(_step_file(run_dir, "samples", step)) as f:
        return {"samples": f["samples"].astype(np.float32), "prompts": f["prompts"], "step": int(f["step"])}


def save_params(run_dir, step, params) -> None:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
    p = _step_file(run_dir, "params", step)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(p)


def load_params(run_dir, step, like):
    """Stacked parameters at ``step``, restored into the structure of ``like``."""
    import jax

    with np.load(_step_file(run_dir, "params", step)) as f:
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        return jax.tree_util.tree_unflatten(treedef, [f[jax.tree_util.keystr(k)] for k, _ in flat])
