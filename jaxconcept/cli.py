"""`jaxconcept` command line: config, data, info, train, analyze, elicit, demo, sd.

Each command is a thin shell over library functions; see README.md. The library reports progress
and warnings through the ``jaxconcept`` logger (``logging``); while a command runs, that logger
prints one line per message on stderr (``--quiet``: warnings only), as do the library's
``rundir.RunWarning`` warnings.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from jaxconcept import config as C


def _add_config_args(p):
    p.add_argument("--preset", default=None, help=f"named preset: {', '.join(C.PRESETS)} (default 2x2)")
    p.add_argument("--config", default=None, help="JSON config file (may name a preset)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set data.sep_col=0.3 or --set 'seeds=[0,100]'")


def _config(args) -> C.Config:
    return C.resolve(args.preset, args.config, args.sets)


COMPILE_CACHE_MAX_BYTES = 8 << 30  # the persistent compilation cache's size; older entries are evicted first


def default_compile_cache() -> Path:
    """Where compiled programs are kept between processes when nothing else is said:
    $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/jaxconcept/xla (~/.cache/jaxconcept/xla)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxconcept" / "xla"


def _compile_cache(args) -> None:
    """Turn on JAX's persistent compilation cache for this process (every command): a program
    compiled once (by any jaxconcept process on this machine with the same versions and device)
    is read back instead of compiled again. Every program is cached, however fast it compiled;
    with a size limit JAX guards each read and write with a file lock, so concurrent processes
    may share the directory. ``--no-compile-cache`` leaves JAX's settings as they are."""
    if getattr(args, "no_compile_cache", False):
        return
    import jax

    path = Path(args.compile_cache) if getattr(args, "compile_cache", None) else default_compile_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)


class CLIError(Exception):
    """A bad command-line input: reported as one line, exit code 2."""


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (0.0 < v <= 1.0):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed a number in (0, 1]")
    return v


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
        from jaxconcept import plots

        plots.data_grid(spec, np.asarray(x), np.asarray(labels), show)
        print(f"wrote {show}")
    return 0


def cmd_config(args):
    """The resolved config as JSON on stdout; what it sweeps and its members on the log."""
    import json

    cfg = _config(args)
    ms = C.members(cfg)
    print(json.dumps(C.to_dict(cfg), indent=1, sort_keys=True))
    log = logging.getLogger("jaxconcept")
    log.info("%d member(s), sweeping %s", len(ms), ", ".join(C.swept_fields(cfg)) or "nothing")
    if args.members:
        group_of = {i: g for g, idx in enumerate(C.groups(cfg, ms)) for i in idx}
        for i, m in enumerate(ms):
            log.info("member %d (group %d): %s", i, group_of[i], json.dumps({**C.sweep_settings(m),
                                                                            **C.member_values(cfg, m)}))
    return 0


def cmd_info(args):
    import jax

    from jaxconcept import data as D, diffusion, nets

    cfg = _config(args)
    spec = D.spec(C.members(cfg)[0].data)
    net = nets.build(cfg.model, spec)
    params = jax.eval_shape(lambda k: diffusion.init_params(net, cfg.model, spec, k), jax.random.PRNGKey(0))
    n = nets.param_count(params)
    flops = diffusion.train_step_flops(cfg)
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
    from jaxconcept import loop

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


def _probe_args(p) -> None:
    p.add_argument("--probe-cache", default=None, metavar="DIR",
                   help="where trained concept probes are kept (default ~/.cache/jaxconcept/probes)")
    p.add_argument("--probe-bar", type=_threshold, default=None, metavar="X",
                   help="accuracy the probe must reach, in (0, 1] (default 0.99 images, 0.85 celeba attributes)")


def _measure(args) -> str:
    return args.measure.replace("-", "_")


def cmd_analyze(args):
    from jaxconcept import claims, dynamics, plots

    analysis = dynamics.analyze_run(args.run_dir, args.threshold, measure=_measure(args), probe_kw=_probe_kw(args))
    if args.by or args.colour:
        try:
            plots.sweep_axes(analysis, args.by, args.colour)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    from jaxconcept import rundir

    shown = dynamics.shown_samples(args.run_dir, analysis, probe_kw=_probe_kw(args))
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
            print(f"  member {m['index']} seed {m['seed']} {name}: learning time {lt}; saturation at step "
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
    from jaxconcept import claims, elicit

    if args.every < 1:
        raise CLIError(f"--every={args.every} is invalid: allowed an integer >= 1")
    out = elicit.elicit_run(args.run_dir, args.threshold, concept=args.concept, every=args.every,
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


def _known_errors() -> tuple:
    """Errors that are the user's to fix: reported in one line, exit code 2."""
    from jaxconcept import data, probe, rundir
    from jaxconcept.sd import SDError

    return (CLIError, C.ConfigError, data.DataError, rundir.RunDirError, probe.ProbeError, rundir.RunError, SDError)


def _common() -> argparse.ArgumentParser:
    """Options every command takes."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR between runs (default $JAX_COMPILATION_CACHE_DIR, else "
                        "~/.cache/jaxconcept/xla)")
    g.add_argument("--no-compile-cache", action="store_true", help="do not keep compiled programs between runs")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxconcept", description=__doc__.splitlines()[0])
    ap.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only, no progress messages")
    sub = ap.add_subparsers(dest="command", required=True)
    common = _common()

    def add(name, **kw):
        return sub.add_parser(name, parents=[common], **kw)

    p = add("data", help="render a dataset of G (every class) to .npz, optionally a PNG of it")
    _add_config_args(p)
    p.add_argument("--n-per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .npz")
    p.add_argument("--show", default=None,
                   help="output .png: a grid of examples per class (images), a scatter in concept space (vectors)")
    p.set_defaults(fn=cmd_data)

    p = add("config", help="print the resolved config (preset, file and overrides) as JSON; its members on stderr")
    _add_config_args(p)
    p.add_argument("--members", action="store_true", help="also list every member's sweep values (stderr)")
    p.set_defaults(fn=cmd_config)

    p = add("info", help="parameter count and FLOPs per training step of the configured model")
    _add_config_args(p)
    p.set_defaults(fn=cmd_info)

    p = add("train", help="train a run or a sweep (lists in sweep fields) into RUN_DIR")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (resumes if it holds the same config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="multi-process training: call jax.distributed.initialize() first (run on every host)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0 (implies --distributed; or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in all (or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0..N-1 (or JAX_PROCESS_ID)")
    p.add_argument("--join-timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for every process to join before giving up with a message (default 300)")
    p.set_defaults(fn=cmd_train)

    p = add("analyze", help="concept-space analysis of a run: analysis.json, the claims table, figures")
    p.add_argument("run_dir")
    p.add_argument("--measure", choices=("reference", "first-crossing"), default="reference",
                   help="learning time: the reference's (smoothed, 3 checkpoints above; default) or the first crossing")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help="accuracy that counts as learned, in (0, 1] (default 0.9 for reference, 0.8 for first-crossing)")
    p.add_argument("--by", default=None, metavar="FIELD",
                   help="sweep.png: learning time against this swept field (e.g. train.lr; default: the first swept "
                        "field with numbers outside data)")
    p.add_argument("--colour", default=None, metavar="FIELD",
                   help="sweep.png: colour points by this swept field (e.g. data.sep_col; default: another swept field)")
    _probe_args(p)
    p.set_defaults(fn=cmd_analyze)

    p = add("elicit", help="hidden capabilities: overprompting and latent interventions")
    p.add_argument("run_dir")
    p.add_argument("--threshold", type=_threshold, default=0.8, help="accuracy that counts as learned, in (0, 1]")
    p.add_argument("--concept", default=None,
                   help="concept to overprompt and steer (default: the weakest concept signal)")
    p.add_argument("--every", type=int, default=1, metavar="K",
                   help="elicit at every K-th saved checkpoint (and the last): a K-th of the cost (default 1)")
    p.add_argument("--measure", choices=("reference", "first-crossing"), default="reference",
                   help="emergence: the reference's smoothed rule (default) or the first crossing")
    _probe_args(p)
    p.set_defaults(fn=cmd_elicit)

    p = add("demo", help="small CPU sweep: train, analyse, elicit, figures (about 2.5 min on 2 cores)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/demo_images)")
    p.add_argument("--images", action="store_true",
                   help="the CPU image study instead (experiments/images_cpu.json: 8 U-Nets, about 38 min on 2 cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting, e.g. --set 'data.m=[2,0.25]'")
    p.set_defaults(fn=cmd_demo)

    from jaxconcept.sd import command as sd_command  # argparse only; the work is in jaxconcept/sd/

    p = add("sd", help="Stable Diffusion 1.x from a local folder: overprompt a concept (grid, npz, JSON)")
    sd_command.add_arguments(p)
    p.set_defaults(fn=sd_command.run)
    for p in sub.choices.values():  # --quiet after the command name too; absent there, the global one stands
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return ap


class _OneLine(logging.Formatter):
    """``jaxconcept: MESSAGE``, ``jaxconcept: warning: MESSAGE`` (and error), on one line."""

    def format(self, record):
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"jaxconcept: {level}" + " ".join(record.getMessage().split("\n"))


def _messages(quiet: bool):
    """While a command runs: the ``jaxconcept`` logger prints on stderr (INFO and up; ``quiet``:
    WARNING and up) and not also through the root logger's handlers; ``rundir.RunWarning``
    warnings go to it. Returns the function that puts everything back (``main`` may be called in
    a process that has its own logging)."""
    import warnings

    from jaxconcept import rundir

    log = logging.getLogger("jaxconcept")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    saved = log.level, log.propagate, warnings.showwarning
    show = warnings.showwarning

    def showwarning(message, category, *a, **kw):
        if issubclass(category, rundir.RunWarning):
            log.warning("%s", message)
        else:
            show(message, category, *a, **kw)

    def restore():
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        warnings.showwarning = saved[2]
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    warnings.showwarning = showwarning
    return restore


def main(argv=None):
    args = build_parser().parse_args(argv)
    restore = _messages(args.quiet)
    _compile_cache(args)
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one in any other command
        print(f"jaxconcept {args.command}: interrupted", file=sys.stderr)
        return 130
    except C.ConfigError as exc:
        print(f"jaxconcept {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # missing or read-only directories, files in the way, full disks
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"jaxconcept {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - only the known kinds below are reported without a traceback
        from jaxconcept import rundir

        if isinstance(exc, rundir.Stopped):
            print(f"jaxconcept {args.command}: {exc}", file=sys.stderr)
            return rundir.EXIT_STOPPED
        if isinstance(exc, _known_errors()):
            print(f"jaxconcept {args.command}: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
