"""The commands of the ``jaxconcept`` command line (data, config, info, train, analyze, elicit,
demo): each a thin shell over library functions that reads its parsed arguments (``cli``) and
prints what it did; a bad input raises ``CLIError`` (one line, exit code 2)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from jaxconcept import config as C


def _config(args) -> C.Config:
    return C.resolve(args.preset, args.config, args.sets)


class CLIError(Exception):
    """A bad command-line input: reported as one line, exit code 2."""


def _output_file(path: str, flag: str) -> Path:
    """A file the command will write: its directory must exist, it must not be a directory."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {path}: is a directory; give a file name")
    if not p.parent.is_dir():
        raise CLIError(f"{flag} {path}: the directory {str(p.parent)!r} does not exist")
    return p


def cmd_data(args):
    import jax
    import numpy as np

    from jaxconcept import data as D

    cfg = _config(args)
    if not (args.out or args.show):
        raise CLIError("give --out FILE.npz and/or --show FILE.png")
    if not 1 <= args.n_per_class <= 100_000:
        raise CLIError(f"--n-per-class={args.n_per_class} is invalid: allowed an integer in [1, 100000]")
    out = _output_file(args.out, "--out") if args.out else None
    show = _output_file(args.show, "--show") if args.show else None
    if cfg.data.kind in D.HOST_FED:
        raise CLIError(f"data.kind={cfg.data.kind!r} has no generating process to render; it reads a dataset")
    m = C.members(cfg)[0].data
    if len(C.members(cfg)) > 1:
        logging.getLogger("jaxconcept").info("the config is a sweep; rendering its first member")
    spec, params = D.spec(m), D.params(m)
    x, cond, labels = D.render_all(spec, params, jax.random.PRNGKey(args.seed), args.n_per_class)
    signal = D.concept_signal(m)
    if out:
        with open(out, "wb") as f:
            np.savez(f, images=np.asarray(x, np.float32), cond=np.asarray(cond), labels=np.asarray(labels),
                     class_names=np.array(spec.class_names), **{f"signal_{k}": v for k, v in signal.items()})
        print(f"wrote {out}: {x.shape[0]} examples of {spec.n_classes} classes; signal {signal}")
    if show:
        from jaxconcept.analysis import plots

        plots.data_grid(spec, np.asarray(x), np.asarray(labels), show)
        print(f"wrote {show}")
    return 0


def cmd_config(args):
    """The resolved config as JSON on stdout; what it sweeps, its classes and its members on the log."""
    import json

    from jaxconcept import data as D

    cfg = _config(args)
    ms = C.members(cfg)
    print(json.dumps(C.to_dict(cfg), indent=1, sort_keys=True))
    log = logging.getLogger("jaxconcept")
    log.info("%d member(s), sweeping %s", len(ms), ", ".join(C.swept_fields(cfg)) or "nothing")
    spec = D.spec(ms[0].data)  # the classes as the data resolve them (e.g. vectors' held_out=[]: the default)
    log.info("training classes %s; held out %s", ", ".join(spec.class_names[c] for c in spec.train_classes),
             ", ".join(spec.class_names[c] for c in spec.held_out) or "none")
    if args.members:
        group_of = {i: g for g, idx in enumerate(C.groups(cfg, ms)) for i in idx}
        for i, m in enumerate(ms):
            log.info("member %d (group %d): %s", i, group_of[i], json.dumps({**C.sweep_settings(m),
                                                                            **C.member_values(cfg, m)}))
    return 0


def cmd_info(args):
    import jax

    from jaxconcept import data as D, vdm, nets

    cfg = _config(args)
    spec = D.spec(C.members(cfg)[0].data)
    net = nets.build(cfg.model, spec)
    params = jax.eval_shape(lambda k: vdm.init_params(net, cfg.model, spec, k), jax.random.PRNGKey(0))
    n = nets.param_count(params)
    flops = vdm.train_step_flops(cfg)
    n_members = len(C.members(cfg))
    print(f"preset/config: {cfg.name or '-'}; {cfg.model.arch} on {spec.kind} {spec.x_shape}, cond {spec.cond_dim}, "
          f"compute {cfg.model.dtype}")
    print(f"parameters: {n:,} (network {n - 2:,} + 2 schedule)")
    print(f"FLOPs per training step (batch {cfg.train.batch_size}, forward + backward, XLA): {flops / 1e9:.3f} GFLOP")
    print(f"whole run: {n_members} member(s) x {cfg.train.steps:,} steps = {n_members * cfg.train.steps * flops / 1e15:.3f} "
          f"PFLOP of training")
    print(f"tap points: {len(nets.tap_names(net, spec))}")
    return 0


def _distributed(args) -> None:
    """jax.distributed.initialize with what the flags (else the JAX_* environment variables) name;
    whatever they leave out is detected by JAX from the launcher (SLURM, Open MPI, a TPU pod), so
    partial overrides work (e.g. JAX_COORDINATOR_ADDRESS under Open MPI). Peers that do not all
    join within ``--join-timeout`` seconds end the process with one message, not a silent wait."""
    import os
    import threading

    import jax

    coord = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = args.num_processes if args.num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    try:
        nproc = None if nproc is None else int(nproc)
        pid = None if pid is None else int(pid)
    except ValueError:
        raise CLIError(f"--num-processes={nproc!r}, --process-id={pid!r}: allowed integers") from None
    if nproc is not None and nproc < 1 or pid is not None and not 0 <= pid < (nproc if nproc is not None else pid + 1):
        raise CLIError(f"--num-processes={nproc}, --process-id={pid}: allowed N >= 1 and 0 <= I < N")
    if coord is not None and ":" not in str(coord):
        raise CLIError(f"--coordinator={coord!r} is invalid: allowed HOST:PORT, e.g. 10.0.0.1:1234")
    if not args.join_timeout > 0:
        raise CLIError(f"--join-timeout={args.join_timeout} is invalid: allowed a number of seconds > 0")
    timeout = args.join_timeout
    who = "this process" if pid is None or nproc is None else f"process {pid} of {nproc}"
    print(f"jaxconcept train: {who} waiting up to {timeout:.0f} s for its peers"
          + (f" at {coord}" if coord else ""), file=sys.stderr, flush=True)

    def give_up():  # JAX's own timeout aborts the process with a stack dump: say what happened first
        print(f"jaxconcept train: {who}: not every process joined within {timeout:.0f} s (--join-timeout); "
              "a peer did not start, or stopped before joining (e.g. on a bad config: see its output)",
              file=sys.stderr, flush=True)
        os._exit(2)
    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coord, nproc, pid, initialization_timeout=int(timeout) + 60)
    except (ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        missing = [f for f, v in (("--coordinator", coord), ("--num-processes", nproc), ("--process-id", pid))
                   if v is None]
        if missing:
            raise CLIError("--coordinator, --num-processes and --process-id go together (or JAX_COORDINATOR_ADDRESS, "
                           "JAX_NUM_PROCESSES, JAX_PROCESS_ID) unless a launcher JAX detects (SLURM, Open MPI, a TPU "
                           f"pod) supplies the rest; missing {', '.join(missing)} [{msg}]") from None
        raise CLIError(f"jax.distributed.initialize failed: {msg}") from None
    finally:
        watchdog.cancel()


def cmd_train(args):
    cfg = _config(args)
    from jaxconcept.train import loop

    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        _distributed(args)  # multi-host (TPU pod, several GPU hosts): every host runs this command
    import jax

    lead = jax.process_index() == 0
    n = len(C.members(cfg))
    swept = ", ".join(C.swept_fields(cfg)) or "nothing"
    n_groups = len(C.groups(cfg))
    groups = f" in {n_groups} groups, one after another (differing in {', '.join(C.group_fields(cfg))})" if (
        n_groups > 1) else ""
    if lead:
        print(f"jaxconcept train: {n} member(s) (sweeping {swept}){groups}, {cfg.train.steps} steps -> {args.out}")
    loop.train(cfg, args.out, progress=not args.no_progress)
    if lead:
        print(f"jaxconcept train: done; next: jaxconcept analyze {args.out}")
    return 0


def _probe_kw(args) -> dict:
    """``probe.probe_for`` settings from ``--probe-cache`` and ``--probe-bar``."""
    return {k: v for k, v in (("cache", args.probe_cache), ("bar", args.probe_bar)) if v is not None}


def _measure(args) -> str:
    return args.measure.replace("-", "_")


def cmd_analyze(args):
    from jaxconcept.analysis import analyze, claims, plots

    analysis = analyze.analyze_run(args.run_dir, args.threshold, measure=_measure(args), probe_kw=_probe_kw(args))
    if args.by or args.colour:
        try:
            plots.sweep_axes(analysis, args.by, args.colour)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    from jaxconcept import rundir

    shown = analyze.shown_samples(args.run_dir, analysis, probe_kw=_probe_kw(args))
    figs = plots.all_figures(analysis, shown, rundir.path(args.run_dir) / "figures", by=args.by, colour=args.colour)
    print(f"jaxconcept analyze: {len(analysis['members'])} member(s), {len(analysis['steps'])} checkpoints; "
          f"learning time: {analysis['definition']}")
    for m in analysis["members"]:
        for c in analysis["held_out"]:
            name = analysis["class_names"][c]
            lt = ", ".join(f"{k} {'never' if v is None else round(v)}" for k, v in m["learning_time"][name].items())
            t = m["turn"][name]
            turn = f"our turn at step {t['step']} ({t['angle']:.0f} deg)" if t["turned"] else "no turn (ours)"
            frozen = f"; frozen (diverged) at step {m['frozen_at']}" if m.get("frozen_at") is not None else ""
            setting = claims.setting_label(m)
            where = f"seed {m['seed']}" + ("" if setting == "all" else f", {setting}")
            print(f"  member {m['index']} ({where}) {name}: learning time {lt}; saturation at step "
                  f"{m['saturation'] if m['saturation'] is not None else 'never'}; {turn}{frozen}")
    for m in analysis["members"]:
        if m.get("nan_samples"):
            print(f"  member {m['index']}: {m['nan_samples']} non-finite sample(s) counted as wrong")
    if analysis["claims"]:
        print("claims (the summary table; analysis.json 'claims'):")
        print(claims.format_table(analysis["claims"]))
    print(f"jaxconcept analyze: wrote {args.run_dir}/analysis.json and " + ", ".join(str(f) for f in figs))
    return 0


def cmd_elicit(args):
    from jaxconcept.analysis import claims
    from jaxconcept.elicit import measure

    if args.every < 1:
        raise CLIError(f"--every={args.every} is invalid: allowed an integer >= 1")
    out = measure.elicit_run(args.run_dir, args.threshold, concept=args.concept, every=args.every,
                             measure=_measure(args), probe_kw=_probe_kw(args))
    print(f"jaxconcept elicit: emergence: {out['definition']}; turn = saturation of the training classes")
    for m in out["members"]:
        e, rel = m["emergence_step"], m["emergence_minus_turn"]
        arms = ", ".join(f"{k} {'never' if v is None else round(v)}"
                         + ("" if rel.get(k) is None else f" (turn {rel[k]:+.0f})") for k, v in e.items())
        print(f"  member {m['index']} ({m['concept']} pushed): {arms}; turn {m['turn_step']}")
    print(claims.format_table(out["claims"]))
    print(f"wrote {args.run_dir}/elicit.json, figures/elicit.png and figures/elicit_turn.png")
    return 0


def cmd_demo(args):
    from jaxconcept import demo

    out = args.out or ("runs/demo_images" if args.images else "runs/demo")
    cfg = demo.demo_config(args.sets, args.images)
    print(f"jaxconcept demo: {len(C.members(cfg))} models x {cfg.train.steps} steps -> {out}")
    figs = demo.run(out, progress=not args.no_progress, extra_sets=args.sets, images=args.images)["figures"]
    print("jaxconcept demo: figures\n  " + "\n  ".join(figs))
    return 0
