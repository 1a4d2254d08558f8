"""`jaxconcept` command line: config, data, info, train, analyze, elicit, demo, sd.

This module owns the arguments, the messages and the exit codes; the commands themselves are
``commands`` (sd: ``sd.command``).

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

from jaxconcept import commands as K, config as C
from jaxconcept.commands import CLIError  # noqa: F401 - the command line's error


def _add_config_args(p):
    p.add_argument("--preset", default=None, help=f"named preset: {', '.join(C.PRESETS)} (default 2x2)")
    p.add_argument("--config", default=None, help="JSON config file (may name a preset)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set data.sep_col=0.3 or --set 'seeds=[0,100]'")


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


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (0.0 < v <= 1.0):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed a number in (0, 1]")
    return v


def _known_errors() -> tuple:
    """Errors that are the user's to fix: reported in one line, exit code 2."""
    from jaxconcept import data, rundir, train
    from jaxconcept.analysis import probe
    from jaxconcept.sd import SDError

    return (CLIError, C.ConfigError, data.DataError, rundir.RunDirError, probe.ProbeError, train.RunError, SDError)


def _probe_args(p) -> None:
    p.add_argument("--probe-cache", default=None, metavar="DIR",
                   help="where trained concept probes are kept (default ~/.cache/jaxconcept/probes)")
    p.add_argument("--probe-bar", type=_threshold, default=None, metavar="X",
                   help="accuracy the probe must reach, in (0, 1] (default 0.99 images, 0.85 celeba attributes)")


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
    p.set_defaults(fn=K.cmd_data)

    p = add("config", help="print the resolved config (preset, file and overrides) as JSON; its members on stderr")
    _add_config_args(p)
    p.add_argument("--members", action="store_true", help="also list every member's sweep values (stderr)")
    p.set_defaults(fn=K.cmd_config)

    p = add("info", help="parameter count and FLOPs per training step of the configured model")
    _add_config_args(p)
    p.set_defaults(fn=K.cmd_info)

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
    p.set_defaults(fn=K.cmd_train)

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
    p.set_defaults(fn=K.cmd_analyze)

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
    p.set_defaults(fn=K.cmd_elicit)

    p = add("demo", help="small CPU sweep: train, analyse, elicit, figures (about 2.5 min on 2 cores)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/demo_images)")
    p.add_argument("--images", action="store_true",
                   help="the CPU image study instead (experiments/images_cpu.json: 8 U-Nets, about 38 min on 2 cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting, e.g. --set 'data.m=[2,0.25]'")
    p.set_defaults(fn=K.cmd_demo)

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
        from jaxconcept import train

        if isinstance(exc, train.Stopped):
            print(f"jaxconcept {args.command}: {exc}", file=sys.stderr)
            return train.EXIT_STOPPED
        if isinstance(exc, _known_errors()):
            print(f"jaxconcept {args.command}: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
