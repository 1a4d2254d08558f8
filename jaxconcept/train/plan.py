"""The "auto" stacking plan: the fastest way to stack a sweep's members whose training step fits
in memory, measured from XLA's memory analysis of the compiled step (shapes only, nothing runs).

``build(cfg)`` is the sweep to train: ``stack.build`` with ``train.strategy``, or, for "auto",
the planned sweep, whose K-step program the plan compiled while measuring it (training reuses it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax

from jaxconcept import config as C
from jaxconcept.train import stack
from jaxconcept.train import RunError

HEADROOM = 0.85  # "auto" plans for this share of the memory budget
TABLE = Path(__file__).with_name("strategies.json")  # the stackings measured fastest, per device kind


def host_available_memory(root: str = "/") -> tuple[float, str]:
    """Bytes the host can still give this process, and where the figure comes from: the kernel's
    MemAvailable (free pages plus reclaimable page cache; MemFree alone counts the cache as used),
    lowered to what a cgroup limit leaves (its limit less its working set: usage less inactive
    file pages), as container runtimes count it. ``root`` prefixes /proc and /sys (tests)."""
    base = Path(root)
    found = []
    try:
        info = dict(line.split(":", 1) for line in (base / "proc/meminfo").read_text().splitlines() if ":" in line)
        found.append((float(info["MemAvailable"].split()[0]) * 1024, "MemAvailable"))
    except (OSError, KeyError, ValueError):
        pass
    for limit_f, usage_f, stat_f in (("memory.max", "memory.current", "memory.stat"),  # cgroup v2, then v1
                                     ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                      "memory/memory.stat")):
        cg = base / "sys/fs/cgroup"
        try:
            limit = (cg / limit_f).read_text().strip()
            if limit == "max" or float(limit) >= 2 ** 60:  # no limit
                continue
            stat = dict(line.split() for line in (cg / stat_f).read_text().splitlines() if len(line.split()) == 2)
            used = float((cg / usage_f).read_text()) - float(stat.get("inactive_file", stat.get("total_inactive_file", 0)))
            found.append((max(0.0, float(limit) - used), "the cgroup's memory limit less its working set"))
            break
        except (OSError, ValueError):
            continue
    if not found:
        return float(16 << 30), "unknown (no /proc/meminfo): assumed 16 GiB"
    return min(found)


def memory_budget(cfg: C.Config, device=None) -> tuple[float, str]:
    """Bytes one device may use, and where the figure comes from: ``train.memory_budget`` when
    set, else the device's free memory (its allocator's limit less what is in use), else (CPU)
    the host's available memory (``host_available_memory``) shared among the local devices."""
    if cfg.train.memory_budget:
        return float(cfg.train.memory_budget), "train.memory_budget"
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"free memory of {device.device_kind}"
    avail, source = host_available_memory()
    n = jax.local_device_count()
    return avail / max(1, n), f"host memory available: {source}" + (f", shared by {n} devices" if n > 1 else "")


def memory(sw: stack.Stack) -> tuple[float, float]:
    """(peak bytes, bytes that do not shrink with chunking: arguments + outputs - donated) one
    device needs for the ``advance`` program of ``sw``, from XLA's memory analysis of it
    (compiled from shapes alone, once: training calls the same compiled program). NaN when the
    backend gives no analysis."""
    m = sw.programs(("advance",)).advance.memory_analysis()
    if m is None:
        return float("nan"), float("nan")
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - getattr(m, "alias_size_in_bytes", 0)
    return float(fixed + m.temp_size_in_bytes), float(fixed)


def step_memory(sw: stack.Stack) -> float:
    """Peak bytes one device needs for ``advance`` (XLA's compiled memory analysis: arguments,
    outputs and temporaries, less donated buffers), from shapes alone."""
    return memory(sw)[0]


def measured_choice(device_kind: str, arch: str, members: int, table: list | None = None) -> dict | None:
    """The stacking measured fastest for ``members`` members per device of ``arch`` ("unet",
    "mlp") on a device of ``device_kind`` (``jax.Device.device_kind``, e.g. "cpu", "NVIDIA H200"),
    from ``table`` (default: jaxconcept/train/strategies.json, written from benchmarks/device_check.py's
    measurements): the first entry that matches, or None where nothing was measured.

    An entry: {"device_kind", "arch", "min_members", "max_members", "strategy" ("vmap", "map",
    "unroll"), "chunk" (for "map"), "conv" (optional: the ``model.conv`` it was measured with,
    applied where the config says "auto"), "source" (where the measurement is written up)}."""
    if table is None:
        table = json.loads(TABLE.read_text())["measured"]
    for e in table:
        if (e["device_kind"] == device_kind and e["arch"] == arch
                and e.get("min_members", 1) <= members <= e.get("max_members", float("inf"))):
            return e
    return None


def first_choice(sw: stack.Stack, table: list | None = None) -> tuple[str, int, str | None, str]:
    """(strategy, chunk, conv or None, why) to try first for ``sw``: the measured fastest
    (``measured_choice``), else the rule of thumb: "unroll" for a U-Net on a CPU (XLA:CPU runs
    vmapped, grouped convolutions slowly), "vmap" elsewhere."""
    per_dev = len(sw.padded) // sw.mesh.size
    kind = sw.mesh.devices.flat[0].device_kind
    e = measured_choice(kind, sw.cfg.model.arch, per_dev, table)
    if e is not None:
        return e["strategy"], e.get("chunk", 1), e.get("conv"), f"measured fastest on {kind} ({e['source']})"
    rule = "unroll" if sw.backend == "cpu" and sw.cfg.model.arch == "unet" else "vmap"
    return rule, 1, None, (f"not measured on {kind} (benchmarks/device_check.py measures it): {rule}, the rule for "
                           f"{sw.cfg.model.arch} on {sw.backend}")


def plan(sw: stack.Stack, table: list | None = None) -> tuple[stack.Stack, str]:
    """The fastest stacking of ``sw``'s members whose step fits in memory.

    Preference: ``first_choice`` (the measured fastest for this device kind, else "vmap", or on
    a CPU "unroll" for conv nets), then "map" in chunks of half as many members, and so on down to one member at a time; a chunk
    is compiled only when a prediction from the plans measured so far (the memory chunking cannot
    shrink, plus temporaries in proportion to the chunk) says it is smaller than every refused
    plan and may fit. Each plan tried is compiled from shapes, and the chosen one's program is the
    one training runs (compiled once).
    Returns (the sweep with its strategy chosen, the reason).
    Raises RunError naming each plan measured, the budget and its source, and what to change.
    """
    per_dev = len(sw.padded) // sw.mesh.size
    strategy, chunk, conv, why = first_choice(sw, table)
    if conv is not None and sw.cfg.model.conv == "auto" and conv != "auto":
        with_conv = lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, conv=conv))  # noqa: E731
        sw = stack.build(with_conv(sw.cfg), list(sw.mesh.devices.flat), strategy="vmap",
                         members=[with_conv(m) for m in sw.members])
    first = dataclasses.replace(sw, strategy=strategy, chunk=min(chunk, per_dev))
    if per_dev == 1:
        return first, f"one member per device: nothing to chunk; {why}"
    budget, source = memory_budget(sw.cfg)
    limit = HEADROOM * budget
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    need, fixed = memory(first)
    tried = [f"{first.strategy} of {per_dev} members {mib(need)}"]
    if not need > limit:  # NaN (no analysis) counts as fitting
        return first, (f"{why}; {per_dev} member(s) per device need {mib(need)} of {mib(budget)} ({source}, "
                       f"{HEADROOM:.0%} planned)")
    smallest, temp, c = need, need - fixed, per_dev
    while c > 1:
        c = -(-c // 2)
        if fixed + temp * c / per_dev >= min(smallest, limit):
            continue  # predicted no smaller than a refused plan, or over the budget: not compiled
        cand = dataclasses.replace(sw, strategy="map", chunk=c)
        got, _ = memory(cand)
        tried.append(f"map in chunks of {c} {mib(got)}")
        if not got > limit:
            return cand, (f"{per_dev} member(s) per device in chunks of {c} need {mib(got)} of {mib(budget)} "
                          f"({source}, {HEADROOM:.0%} planned); tried " + ", ".join(tried))
        smallest = min(smallest, got)
    raise RunError(f"the training step of {per_dev} member(s) per device needs more than the {mib(limit)} planned "
                   f"({HEADROOM:.0%} of {mib(budget)}, {source}): " + "; ".join(tried)
                   + f" (at least {mib(fixed)} hold the stacked state and batches whatever the chunking); if more "
                   "memory is free, say how much with train.memory_budget (bytes); else train fewer members per run "
                   "(seeds, sweep lists), a smaller model or train.batch_size, or use more devices")


def build(cfg: C.Config, devices=None, members=None) -> stack.Stack:
    """The sweep of ``cfg`` (or of ``members``, one group of it: ``stack.build``) to train on
    ``devices`` (default: all), its stacking chosen: the configured ``train.strategy``, or for
    "auto" the one ``plan`` chooses for this group (reported in one line by process 0). Raises
    RunError when no stacking fits in memory."""
    if cfg.train.strategy != "auto":
        return stack.build(cfg, devices, members=members)
    chosen, why = plan(stack.build(cfg, devices, strategy="vmap", members=members))
    if jax.process_index() == 0:
        chunks = f" (chunks of {chosen.chunk})" if chosen.strategy == "map" else ""
        logging.getLogger(__name__).info(f"stacking strategy {chosen.strategy}{chunks}: {why}")
    return chosen
