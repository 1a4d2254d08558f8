"""The budget, the JSON report and the measured stacking table of ``device_check.py``.

The table is ``plan.measured_choice``'s (jaxconcept/train/strategies.json, shipped in the package;
``train.strategy="auto"`` tries its entry first, the first entry that matches winning). A check
writes the entries it measured to DIR/strategies.json in the same form:

    {"measured": [{"device_kind": "NVIDIA H200",   # jax Device.device_kind
                   "arch": "unet",                 # model.arch
                   "min_members": 1,               # members per device this entry covers, from
                   "max_members": 16,              #   the geometric midpoints between timed sizes
                   "strategy": "map",              # train.strategy: "vmap", "map" or "unroll"
                   "chunk": 1,                     # train.map_batch_size for "map"
                   "conv": "auto",                 # model.conv applied where the config says "auto"
                   "members": 8,                   # the stack size timed
                   "dtype": "bfloat16",            # model.dtype timed
                   "model_steps_per_s": 1234.5,    # the winner's rate; then every stacking's
                   "timed": {"vmap": 1000.0, "map/1": 1234.5, "vmap+explicit": 990.1},
                   "shape": {"batch_size": 64, "image_size": 32, "ch": 64, "ch_mult": [1, 2, 4],
                             "num_res_blocks": 2, "n_params": 10635013},
                   "source": "benchmarks/device_check.py 2026-12-05T10:00:00+00:00, commit abc1234, jax 0.11.2"},
                  ...]}

``merge_strategies`` puts a check's entries into the package's table: they replace every entry of
the same device kind and architecture (one check times the whole range), other keys of the
table (its "_doc") are kept.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

NEEDED = ("device_kind", "arch", "strategy", "source")


class Budget:
    """Seconds since the start against the budget; each stage gets a deadline from its share."""

    def __init__(self, budget_s: float, reserve_s: float):
        self.t0, self.total, self.reserve = time.perf_counter(), budget_s, reserve_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.reserve - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()

    def deadline(self, share: float, later_shares) -> float:
        """A perf_counter deadline: ``share`` of what is left against the shares still to come,
        so time one stage does not use passes to the next."""
        frac = share / (share + sum(later_shares))
        return time.perf_counter() + max(0.0, self.left()) * frac


class Report:
    """The JSON record, written whole (temporary file, rename) after every stage."""

    def __init__(self, out_dir, budget: Budget, head: dict, schema: int):
        self.path = Path(out_dir) / "device_check.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.data = {"schema": schema, **head, "ceiling": None, "flops_per_model_step": None, "train": [],
                     "torch": [], "sampler": None, "sd": [], "winners": [], "stages": {}, "skipped": [],
                     "errors": [], "complete": False}

    def skip(self, what: str, why: str):
        self.data["skipped"].append({"what": what, "why": why})
        print(f"  skipped {what}: {why}", flush=True)

    def error(self, what: str, exc: BaseException):
        msg = f"{type(exc).__name__}: {exc}".strip()
        self.data["errors"].append({"what": what, "error": msg[:2000]})
        print(f"  FAILED {what}: {msg.splitlines()[0][:300] if msg else ''}", flush=True)

    def write(self):
        self.data["elapsed_s"] = round(self.budget.elapsed(), 3)
        write_json(self.path, self.data)


def write_json(path, data):
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def finite(v):
    """A JSON-safe number: None for missing, NaN or infinite values."""
    return None if v is None or not math.isfinite(v) else float(v)


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def winners(report: dict) -> list[dict]:
    """Table entries (module docstring) of a check's report: per stack size timed in more than
    one stacking in the first dtype, the fastest, covering the members per device from the
    geometric midpoint below it to the one above (the smallest from 1, the largest without end)."""
    rows = [r for r in report["train"] if r.get("status") == "ok" and r["dtype"] == report["train"][0]["dtype"]]
    cfg, dev = report["config"], report["device"]
    sizes = sorted(m for m in {r["members"] for r in rows} if sum(r["members"] == m for r in rows) > 1)
    edges = [math.floor(math.sqrt(a * b)) for a, b in zip(sizes, sizes[1:])]  # hi of the smaller size
    out = []
    for i, m in enumerate(sizes):
        mine = [r for r in rows if r["members"] == m]
        best = max(mine, key=lambda r: r["model_steps_per_s"])
        e = {"device_kind": dev["kind"], "arch": cfg["arch"], "min_members": 1 if i == 0 else edges[i - 1] + 1}
        if i < len(edges):
            e["max_members"] = edges[i]
        e |= {"strategy": best["strategy"], "chunk": best["chunk"] or 1, "conv": best["conv"], "members": m,
              "dtype": best["dtype"], "model_steps_per_s": round(best["model_steps_per_s"], 3),
              "timed": {r["stacking"]: round(r["model_steps_per_s"], 3) for r in mine},
              "shape": {k: cfg[k] for k in ("batch_size", "image_size", "ch", "ch_mult", "num_res_blocks")}
              | {"n_params": report.get("n_params")},
              "source": f"benchmarks/device_check.py {report['created']}, commit {report.get('commit')}, "
                        f"jax {dev['jax']}" + (", --tiny" if report.get("tiny") else "")}
        out.append(e | ({"tiny": True} if report.get("tiny") else {}))
    return out


def merge_strategies(src, into) -> int:
    """Merge the entries of a check's strategies.json into the table ``into``: they replace every
    entry of the same (device_kind, arch). Returns the table's entry count.
    Raises ValueError (one line) for a file that is not such a table or entries from a --tiny run."""
    new = _read_table(src)
    if any(e.get("tiny") for e in new["measured"]):
        raise ValueError(f"{src}: entries from a --tiny run (the tiny U-Net) do not belong in the table")
    into = Path(into)
    table = _read_table(into) if into.exists() else {"measured": []}
    keys = {(e["device_kind"], e["arch"]) for e in new["measured"]}
    table["measured"] = [e for e in table["measured"] if (e["device_kind"], e["arch"]) not in keys] + new["measured"]
    write_json(into, table)
    return len(table["measured"])


def _read_table(path) -> dict:
    try:
        t = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable stacking table ({type(exc).__name__}: {exc})") from None
    if not isinstance(t, dict) or not isinstance(t.get("measured"), list):
        raise ValueError(f"{path}: not a stacking table (an object with a \"measured\" list)")
    for e in t["measured"]:
        missing = [k for k in NEEDED if k not in e]
        if missing:
            raise ValueError(f"{path}: an entry lacks {', '.join(missing)}")
    return t
