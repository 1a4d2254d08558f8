"""The stacked-training stage of ``device_check.py``: the run's init once, then every row timed
as its program comes out of the compile farm."""
from __future__ import annotations

import concurrent.futures
import gc
import time

import check_report as CR
import stacking as S

GIB = 2 ** 30
HEADER = (f"{'dtype':>8} {'members':>7} {'stacking':>13} {'n/call':>6} {'model-steps/s':>13} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'XLA GiB':>8} {'compile s':>9} {'busy':>4}")


def train_stage(st, deadline: float):
    """Initialise the run's members (the first program compiled), then time each row when its
    program is ready and no other training program is compiling (XLA autotunes on the device),
    or sooner when the rows still to time need the time left. Rows whose program is not ready
    by the deadline are skipped, naming why; their compiles are dropped if not yet started."""
    a, rep = st.a, st.rep
    per_row = 2 * a.measure_s + (1.5 if st.c.accel else 0.5)
    got = st._wait("init", deadline - per_row)
    if got is None:
        for r in st.rows:
            rep.skip(r.label, "the run's init did not compile before the stage's deadline")
        return
    compiled_init, info = got
    t = time.perf_counter()
    st.state = S.init_state(st.run_sweep, compiled_init)
    rep.data["init"] = {"members": st.run_sweep.size, "strategy": st.run_sweep.strategy, "lower_s": info["lower_s"],
                        "compile_s": info["compile_s"], "run_s": time.perf_counter() - t}
    rep.data["n_params"] = st.run_sweep.layout.size
    rep.write()
    print(f"init of the run's {st.run_sweep.size} members: compiled in {info['compile_s']:.1f} s, ran in "
          f"{rep.data['init']['run_s']:.1f} s; every stack size below reuses it", flush=True)
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    pending = list(st.rows)
    while pending:
        walls = [r["wall_s"] for r in rep.data["train"]]
        per_row = max([per_row] + [1.2 * w for w in walls])  # what timing one row has taken so far
        left = deadline - time.perf_counter()
        if left < per_row:
            break
        ready = [r for r in pending if st.futures[r].done()]
        compiling = sum(not st.futures[r].done() for r in st.rows)
        if ready and (compiling == 0 or left <= per_row * len(pending)):
            pending.remove(ready[0])
            _measure(st, ready[0], compiling, deadline)
            continue
        concurrent.futures.wait([st.futures[r] for r in pending], timeout=min(1.0, left - per_row),
                                return_when=concurrent.futures.FIRST_COMPLETED)
    for r in pending:
        f = st.futures[r]
        rep.skip(r.label, "its program was not compiled by the stage's deadline" if not f.done()
                 else "no time left to time it")
    st.farm.cancel([st.futures[r] for r in pending])


def _measure(st, r: S.Row, compiling: int, deadline: float):
    a, rep = st.a, st.rep
    row = {"dtype": r.dtype, "members": r.members, "stacking": r.stacking, "strategy": r.strategy,
           "chunk": r.chunk if r.strategy == "map" else None, "conv": r.conv, "status": "ok",
           "compiles_in_flight": compiling}
    t = time.perf_counter()
    try:
        compiled, info = st.futures[r].result()
        row.update(lower_s=info["lower_s"], compile_s=info["compile_s"], in_flight_at_start=info["in_flight_at_start"],
                   compiled_bytes=S.compiled_bytes(compiled))
        sw = st.sweeps[r]
        state, data = (S.resize(x, r.members, sw) for x in st.state)
        row.update(S.time_advance(sw, compiled, state, data, a.measure_s, st.fits_before(deadline)))
        del state, data
    except Exception as exc:  # noqa: BLE001 - out of memory, or a backend limit: record and go on
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000], wall_s=time.perf_counter() - t)
        rep.data["train"].append(row)
        rep.error(r.label, exc)
        rep.write()
        gc.collect()
        return
    row["wall_s"] = time.perf_counter() - t
    row["peak_bytes_in_use"] = S.peak_bytes(st.c.devices[0])
    row["tflops"], row["mfu"] = st.rates(row["model_steps_per_s"])
    rep.data["train"].append(row)
    rep.write()
    xla = CR.fmt(row["compiled_bytes"] and row["compiled_bytes"] / GIB, ".2f")
    print(f"{r.dtype:>8} {r.members:>7} {r.stacking:>13} {row['n_per_call']:>6} {row['model_steps_per_s']:>13.3f} "
          f"{CR.fmt(row['tflops'], '.3f'):>8} {CR.fmt(row['mfu'], '.1%'):>6} {xla:>8} {row['compile_s']:>9.1f} "
          f"{compiling:>4}", flush=True)
