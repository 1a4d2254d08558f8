"""The budget, the JSON report and the measured stacking table of ``device_check.py``.

The stacking table (DIR/stacking.json of a check; the package's jaxconcept/stacking.json, which
``train.strategy="auto"`` reads) is one JSON object:

    {"format": 1,
     "entries": [{"device_kind": "NVIDIA H200",      # jax Device.device_kind
                  "platform": "gpu",                 # jax Device.platform
                  "arch": "unet",                    # model.arch
                  "members": 32,                     # members per device in the timed stack
                  "strategy": "map",                 # train.strategy: "vmap", "map" or "unroll"
                  "chunk": 8,                        # train.map_batch_size (members per lax.map chunk)
                  "conv": "auto",                    # model.conv to use: "auto" or "explicit"
                  "dtype": "bfloat16",               # model.dtype timed
                  "model_steps_per_s": 1234.5,       # the winner's rate
                  "measured": {"vmap": 1000.0, "map/8": 1234.5, "vmap+explicit": 990.1},
                  "shape": {"batch_size": 64, "image_size": 32, "ch": 64, "ch_mult": [1, 2, 4],
                            "num_res_blocks": 2, "n_params": 10635013},
                  "source": "device_check 2026-12-05T10:00:00+00:00, commit abc1234, jax 0.11.2"}]}

One entry per (device_kind, arch, members); a later measurement replaces an earlier one.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

TABLE_FORMAT = 1
KEY = ("device_kind", "arch", "members")


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
    one stacking in the first dtype, the fastest."""
    rows = [r for r in report["train"] if r.get("status") == "ok" and r["dtype"] == report["train"][0]["dtype"]]
    cfg, dev = report["config"], report["device"]
    out = []
    for m in sorted({r["members"] for r in rows}):
        mine = [r for r in rows if r["members"] == m]
        if len(mine) < 2:
            continue
        best = max(mine, key=lambda r: r["model_steps_per_s"])
        out.append({"device_kind": dev["kind"], "platform": dev["backend"], "arch": cfg["arch"], "members": m,
                    "strategy": best["strategy"], "chunk": best["chunk"] or 1, "conv": best["conv"],
                    "dtype": best["dtype"],
                    "model_steps_per_s": round(best["model_steps_per_s"], 3),
                    "measured": {r["stacking"]: round(r["model_steps_per_s"], 3) for r in mine},
                    "shape": {k: cfg[k] for k in ("batch_size", "image_size", "ch", "ch_mult", "num_res_blocks")}
                    | {"n_params": report.get("n_params")},
                    "source": f"device_check {report['created']}, commit {report.get('commit')}, jax {dev['jax']}"}
                   | ({"tiny": True} if report.get("tiny") else {}))
    return out


def merge_stacking(src, into) -> int:
    """Merge the entries of a check's stacking.json into the table ``into`` (created if missing):
    an entry replaces the one with the same (device_kind, arch, members). Returns the entry count.
    Raises ValueError (one line) for a file of another format or entries from a --tiny run."""
    new = _read_table(src)
    if any(e.get("tiny") for e in new["entries"]):
        raise ValueError(f"{src}: entries from a --tiny run (the tiny U-Net) do not belong in the table")
    into = Path(into)
    table = _read_table(into) if into.exists() else {"format": TABLE_FORMAT, "entries": []}
    keys = {tuple(e[k] for k in KEY) for e in new["entries"]}
    kept = [e for e in table["entries"] if tuple(e[k] for k in KEY) not in keys]
    table["entries"] = sorted(kept + new["entries"], key=lambda e: tuple(str(e[k]).zfill(6) for k in KEY))
    write_json(into, table)
    return len(table["entries"])


def _read_table(path) -> dict:
    try:
        t = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable stacking table ({type(exc).__name__}: {exc})") from None
    if not isinstance(t, dict) or t.get("format") != TABLE_FORMAT or not isinstance(t.get("entries"), list):
        raise ValueError(f"{path}: not a stacking table of format {TABLE_FORMAT}")
    for e in t["entries"]:
        missing = [k for k in KEY + ("strategy", "chunk", "conv") if k not in e]
        if missing:
            raise ValueError(f"{path}: an entry lacks {', '.join(missing)}")
    return t
