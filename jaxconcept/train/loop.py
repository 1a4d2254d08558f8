"""The training driver: ``train(cfg, run_dir)`` trains a sweep into a run directory, with
evaluation, checkpoints, progress, metrics and resume.

The steps between the start (or the restored checkpoint) and the end are cut at the stops of a
``Schedule`` (a pure function of the config and the start: evaluation points, checkpoints, the
end); between stops ``stack.advance`` runs K steps a call. At every stop one record goes to
RUN_DIR/metrics.jsonl (the record; with ``train.tensorboard`` also to RUN_DIR/tensorboard), at
evaluation points the samples and parameters are written, at checkpoints the train state.

SIGTERM (a pre-emption notice) and SIGINT (Ctrl-C) stop a run at the next boundary between
compiled calls: the train state is checkpointed there, with the partial loss sum of the interval
under way (RUN_DIR/checkpoints/segment.json), and ``train`` raises ``Stopped``; running it again
resumes and ends with exactly the numbers of an uninterrupted run. On a multi-process run the
notice is JAX's pre-emption service (``multihost_utils.reached_preemption_sync_point``), which
picks a step every process reaches; each stops at the end of the call that holds it.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass

import jax
import numpy as np

from jaxconcept.train import checkpoint, plan, runconfig, stack
from jaxconcept import config as C, data as D, rundir
from jaxconcept.train import EXIT_STOPPED, RunError, Stopped  # noqa: F401 - part of train's API
from jaxconcept.train.step import eval_params

log = logging.getLogger("jaxconcept")

__all__ = ["EXIT_STOPPED", "RunError", "Schedule", "Stopped", "schedule", "train", "check_processes_agree"]


@dataclass(frozen=True)
class Schedule:
    """Where a run (re)started at ``start`` stops between calls to ``advance``."""

    eval_first: bool  # evaluate the initial state (step 0 is an evaluation point and the run starts at 0)
    stops: tuple  # increasing steps > start at which training pauses and a metrics record is written
    evals: frozenset  # the stops at which samples (and parameters) are evaluated and written
    checkpoints: frozenset  # the stops at which the train state is checkpointed


def schedule(eval_steps, total: int, checkpoint_every: int, start: int = 0, stop_after: int | None = None) -> Schedule:
    """The stops of a run of ``total`` steps restarted at ``start``: every evaluation point, every
    multiple of ``checkpoint_every`` and the end, those after ``start``; with ``stop_after``, those
    before it and ``stop_after`` itself (checkpointed). Pure: the same arguments, the same stops,
    which is what makes a resumed run the uninterrupted one."""
    evals = [s for s in eval_steps if s > start or (s == 0 and start == 0)]
    eval_first = bool(evals) and evals[0] == 0
    evals = evals[1:] if eval_first else evals
    stops = sorted(set(evals) | set(range(checkpoint_every, total + 1, checkpoint_every)) | {total})
    stops = [s for s in stops if s > start]
    if stop_after is not None:
        stops = sorted({s for s in stops if s < stop_after} | ({stop_after} if stop_after > start else set()))
    ckpts = frozenset(s for s in stops if s % checkpoint_every == 0 or s == total or s == stop_after)
    return Schedule(eval_first, tuple(stops), frozenset(evals) & set(stops), ckpts)


def train(cfg: C.Config, run_dir, *, progress: bool = True, devices=None, stop_after: int | None = None):
    """Train the sweep ``cfg`` into ``run_dir`` with evaluation, checkpoints and resume.

    Running the same command again continues from the newest readable checkpoint and ends with
    the same parameters and samples as an uninterrupted run. Only process 0 writes files; every
    process runs this function (multi-host sweeps).

    A sweep whose members need more than one program (``C.groups``: axes that change a shape or
    a program) trains its groups one after another, each in ``rundir.group_dir``.

    Args:
      cfg: the (sweep) config.
      run_dir: output directory (created; must hold the same config if it exists).
      progress: show a tqdm progress bar.
      devices: devices for the model axis (default: all).
      stop_after: stop (after checkpointing) once this step is reached; for tests and budgets.
    Returns:
      (sweep, final stacked state) of the last group — the state holds the padded members.
    Raises:
      Stopped: a signal stopped the run (after a checkpoint).
      RunError: the directory holds another run, is locked by another process, or cannot be
        written; no stacking fits in memory; the processes of a multi-process run disagree.
    """
    run_dir = rundir.path(run_dir)
    if jax.process_count() > 1:
        check_processes_agree(cfg)
    if cfg.train.tensorboard:
        _summary_writer()  # missing tensorboardX is refused before anything is written
    lead = jax.process_index() == 0
    try:
        runconfig.prepare(cfg, run_dir)
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
        with rundir.lock(run_dir) if lead else contextlib.nullcontext(), _StopRequests() as stops:
            return _train_groups(cfg, run_dir, progress=progress and lead, devices=devices, stop_after=stop_after,
                                 stops=stops)
    except rundir.RunDirError as exc:
        raise RunError(str(exc)) from None
    except OSError as exc:
        hint = "" if rundir.store.is_local(run_dir) else "; does the bucket exist, and may these credentials write to it?"
        raise RunError(f"cannot write the run directory {run_dir}: {exc.strerror or exc} "
                       f"({exc.filename or run_dir}){hint}") from None


def check_processes_agree(cfg: C.Config) -> None:
    """Every process of a multi-process run compares its resolved config and the versions of
    jaxconcept and jax with every other's (a collective: all processes call it), and all refuse
    together, naming the fields that differ, before anything is written.

    Raises RunError naming, per differing process, each field with process 0's value and its own.
    """
    import json

    from jax.experimental import multihost_utils

    import jaxconcept

    mine = {"config": C.to_dict(cfg), "jaxconcept": jaxconcept.__version__, "jax": jax.__version__}
    blob = np.frombuffer(json.dumps(mine, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    runs = [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes)]
    problems = []
    for i, other in enumerate(runs[1:], 1):
        diffs = [f"{k} {runs[0][k]} vs {other[k]}" for k in ("jaxconcept", "jax") if other[k] != runs[0][k]]
        flat0, flat = runconfig.flat_dict(runs[0]["config"]), runconfig.flat_dict(other["config"])
        diffs += [f"{k} {flat0.get(k)!r} vs {flat.get(k)!r}" for k in sorted(set(flat0) | set(flat))
                  if flat0.get(k) != flat.get(k)]
        if diffs:
            problems.append(f"process {i}: " + ", ".join(diffs))
    if problems:
        raise RunError(f"the {len(runs)} processes of this run disagree (process 0's value vs theirs): "
                       + "; ".join(problems) + "; start every process with the same config and versions")


def _train_groups(cfg, run_dir, *, progress, devices, stop_after, stops):
    """Train every group of ``cfg`` (``C.groups``), one after another, each in its directory
    (``rundir.group_dir``). A group whose last step is checkpointed is done and skipped, unless it
    is the last (whose sweep and state ``train`` returns)."""
    ms = C.members(cfg)
    groups = C.groups(cfg, ms)
    if jax.process_index() == 0:
        log.info("config (what differs from the defaults; all of it: `jaxconcept config` or RUN_DIR/config.json): "
                 "%s", runconfig.differences_from_defaults(cfg))
        runconfig.write_run_files(run_dir, cfg, rundir.member_records(cfg, ms, groups))
    out = None
    for g, idx in enumerate(groups):
        where = rundir.group_dir(run_dir, g, len(groups))
        if len(groups) == 1:
            return _train(cfg, where, progress=progress, devices=devices, stop_after=stop_after, stops=stops)
        if g < len(groups) - 1 and checkpoint.latest_step(where / "checkpoints") >= cfg.train.steps:
            continue
        group = [ms[i] for i in idx]
        if jax.process_index() == 0:
            setting = ", ".join(f"{k}={C.member_values(cfg, group[0])[k]}" for k in C.group_fields(cfg))
            log.info(f"group {g + 1} of {len(groups)}: {len(group)} member(s), {setting}")
        out = _train(group[0], where, progress=progress, devices=devices, stop_after=stop_after, stops=stops,
                     members=group, label=f"group {g + 1}/{len(groups)}")
    return out


def _train(cfg, run_dir, *, progress, devices, stop_after, stops, members=None, label=None):
    """Train one group (``members``, default every member of ``cfg``) in ``run_dir`` (its directory)."""
    from tqdm.auto import tqdm

    lead = jax.process_index() == 0
    sw = plan.build(cfg, devices, members=members)
    if lead:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    state, data = stack.init(sw)
    mngr, start, restored = checkpoint.restore_padded(run_dir / "checkpoints", cfg.train.keep_checkpoints, state,
                                                      sw.size, lambda a: stack.put(sw, a))
    if restored is not None:  # the per-member settings are the config's, whatever the checkpoint holds
        state = restored.replace(hyper=state.hyper)
    start = start or 0
    if lead:
        rundir.reconcile_metrics(run_dir, start)
    feed = D.host_feed(sw.spec, sw.padded, stack.train_keys(sw.padded)) if sw.host_fed else None
    sched = schedule(C.eval_steps(cfg), cfg.train.steps, cfg.train.checkpoint_every, start, stop_after)
    board = _tensorboard(run_dir, start) if cfg.train.tensorboard and lead else None
    if sched.eval_first:
        _evaluate_and_save(sw, state, data, 0, run_dir)

    k = sw.steps_per_call
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
               desc=label)
    step, t0, frozen_reported = start, time.time(), set()
    carry = _segment(run_dir, start, len(sw.padded))  # the loss sum of an interval a signal cut short
    for stop in sched.stops:
        losses = []
        while step < stop and not stops.hit:
            n = min(k, stop - step)
            state, loss = stack.advance(sw, state, data, n, None if feed is None else feed(step, k))
            losses.append((n, loss))
            step += n
            bar.update(n)
            stops.check(step - n, step)
        # summed in the order of an uninterrupted run: the carried partial sum first
        loss_sum = sum((n * stack.host(lv) for n, lv in losses), carry[0])
        loss_n, carry = carry[1] + sum(n for n, _ in losses), (0, 0)
        if step < stop:  # a signal: checkpoint here, with the interval's partial sum
            _stop_inside(sw, run_dir, mngr, state, step, loss_sum, loss_n, stops.hit, lead, trained=step > start)
        loss = sw.real(loss_sum / loss_n)
        alive = sw.real(stack.host(state.alive))
        rate = (step - start) / max(time.time() - t0, 1e-9)
        bar.set_postfix({"loss": f"{np.mean(loss[alive]):.3f}" if alive.any() else "all frozen",
                         "model-steps/s": f"{rate * sw.size:.1f}"})
        for i in np.flatnonzero(~alive):
            if i not in frozen_reported:
                frozen_reported.add(int(i))
                rundir.warn(f"member {i} ({_describe(sw.members[i])}) diverged (non-finite loss) by step "
                            f"{step}; it is frozen, the others carry on")
        record = {"step": step, "train_loss": [float(v) for v in loss], "frozen": [bool(not a) for a in alive],
                  "steps_per_s": rate}
        if step in sched.evals:
            record["val_loss"], record["test_loss"] = _evaluate_and_save(sw, state, data, step, run_dir)
        if lead:
            rundir.append_metrics(run_dir, record)
            if board is not None:
                _write_scalars(board, record)
        if step in sched.checkpoints or (stops.hit and stop != sched.stops[-1]):
            checkpoint.save_real(mngr, step, state, sw.size)
        if stops.hit and stop != sched.stops[-1]:
            mngr.close()
            raise Stopped(step, stops.hit)
    bar.close()
    mngr.close()
    if board is not None:
        board.close()
    return sw, state


class _StopRequests:
    """SIGTERM and SIGINT, while training, ask the run to stop at the next boundary between
    compiled calls (``hit`` names the signal); a second one stops at once (KeyboardInterrupt).
    With several processes, the pre-emption notice is JAX's (its service catches SIGTERM and
    agrees on a step every process reaches); Ctrl-C is then Python's KeyboardInterrupt. The
    handlers are installed from the main thread only, and put back at exit."""

    def __init__(self):
        self.hit, self._old = None, {}

    def __enter__(self):
        self._multi = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            for sig in () if self._multi else (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = signal.Signals(signum).name

    def check(self, before: int, after: int) -> None:
        """After a compiled call took the run from step ``before`` to ``after``.

        JAX's service sets the sync point one past the furthest step any process reported, and
        answers True for that step only; orbax reports the steps it saves. So every step the
        call made is reported, and every process stops at the end of the call that holds the
        sync point: the same call, as all follow the same schedule."""
        if self._multi and not self.hit:
            from jax.experimental import multihost_utils

            with contextlib.suppress(RuntimeError):  # RuntimeError: the pre-emption service is off
                if any(multihost_utils.reached_preemption_sync_point(s) for s in range(before + 1, after + 1)):
                    self.hit = "a pre-emption notice"


def _segment(run_dir, start: int, m: int):
    """(loss sum [m], steps) of the interval that a signal cut short at ``start``
    (RUN_DIR/checkpoints/segment.json, when it names that step), else (0, 0)."""
    try:
        seg = rundir.read_json(run_dir / "checkpoints" / "segment.json", "an interrupted interval's loss sum")
        if seg["step"] == start and start > 0:
            real = np.asarray(seg["loss_sum"], seg["dtype"])
            return np.concatenate([real, np.zeros(m - len(real), real.dtype)]), int(seg["steps"])
    except (rundir.RunDirError, KeyError, TypeError, ValueError):
        pass
    return 0, 0


def _stop_inside(sw, run_dir, mngr, state, step, loss_sum, loss_n, why, lead, trained):
    """Checkpoint ``step`` inside an interval (unless nothing was ``trained`` since the restored
    one), with the interval's loss sum so far (exact: a float's repr reads back the same float),
    and raise Stopped."""
    if trained:
        if lead:
            real = sw.real(np.asarray(loss_sum))
            rundir.write_json(run_dir / "checkpoints" / "segment.json",
                              {"step": step, "steps": loss_n, "dtype": str(real.dtype), "loss_sum": real.tolist()})
        checkpoint.save_real(mngr, step, state, sw.size)
    mngr.close()
    raise Stopped(step, why, saved=trained)


def _evaluate_and_save(sw, state, data, step, run_dir):
    """Evaluate every member at ``step``; process 0 writes its samples (and parameters).
    Returns (val losses, test losses) of the real members as lists."""
    samples, prompts, val, test = stack.evaluate(sw, state, data, step)
    samples, prompts = sw.real(stack.host(samples)), sw.real(stack.host(prompts))  # every process gathers
    val, test = sw.real(stack.host(val)), sw.real(stack.host(test))
    ec = sw.cfg.eval
    params = sw.layout.unravel(sw.real(stack.host(eval_params(state)))) if ec.save_params else None
    if jax.process_index() == 0:
        tol = min(D.storage_tolerance(sw.spec, D.params(m.data)) for m in sw.members)
        rundir.save_samples(run_dir, step, samples, prompts, ec.sample_dtype, tol)
        if params is not None:
            rundir.save_params(run_dir, step, params)
    return [float(v) for v in val], [float(v) for v in test]


def _summary_writer():
    """tensorboardX's SummaryWriter. Raises RunError when tensorboardX is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise RunError("train.tensorboard=true needs tensorboardX: pip install 'jaxconcept[tensorboard]'") from None
    return SummaryWriter


def _tensorboard(run_dir, start: int):
    """A writer of RUN_DIR/tensorboard; the events an interrupted run wrote after ``start`` (the
    restored step) are purged, as those steps are trained and written again."""
    return _summary_writer()(str(run_dir / "tensorboard"), purge_step=start + 1)


def _write_scalars(board, record: dict) -> None:
    """The scalars of one metrics record: <name>/member_<i> for each per-member list, and
    steps_per_s."""
    step = record["step"]
    for name in ("train_loss", "val_loss", "test_loss"):
        for i, v in enumerate(record.get(name, ())):
            board.add_scalar(f"{name}/member_{i}", v, step)
    board.add_scalar("steps_per_s", record["steps_per_s"], step)
    board.flush()


def _describe(m: C.Config) -> str:
    """A member's seed and data sweep fields, e.g. "seed=0, sep_col=0.2, ..."."""
    return ", ".join(f"{k}={v}" for k, v in C.sweep_settings(m).items() if v is not None)
