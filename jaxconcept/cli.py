"""`jaxconcept` command line: data, info, train, analyze, elicit, demo.

Each command is a thin shell over library functions; see README.md.
"""
from __future__ import annotations

import argparse
import sys

from jaxconcept import config as C


def _add_config_args(p):
    p.add_argument("--preset", default=None, help=f"named preset: {', '.join(C.PRESETS)} (default 2x2)")
    p.add_argument("--config", default=None, help="JSON config file (may name a preset)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set data.sep_col=0.3 or --set 'seeds=[0,100]'")


def _config(args) -> C.Config:
    return C.resolve(args.preset, args.config, args.sets)


def cmd_data(args):
    import jax
    import numpy as np

    from jaxconcept import data as D

    cfg = _config(args)
    if not (args.out or args.show):
        print("jaxconcept data: give --out FILE.npz and/or --show FILE.png", file=sys.stderr)
        return 2
    if args.n_per_class < 1:
        print(f"jaxconcept data: --n-per-class={args.n_per_class} is invalid: allowed a positive integer", file=sys.stderr)
        return 2
    m = C.members(cfg)[0].data
    if len(C.members(cfg)) > 1:
        print("jaxconcept data: the config is a sweep; rendering its first member", file=sys.stderr)
    spec, params = D.spec(m), D.params(m)
    x, cond, labels = D.render_all(spec, params, jax.random.PRNGKey(args.seed), args.n_per_class)
    signal = D.concept_signal(m)
    if args.out:
        np.savez(args.out, images=np.asarray(x, np.float32), cond=np.asarray(cond), labels=np.asarray(labels),
                 class_names=np.array(spec.class_names), **{f"signal_{k}": v for k, v in signal.items()})
        print(f"wrote {args.out}: {x.shape[0]} examples of {spec.n_classes} classes; signal {signal}")
    if args.show:
        from jaxconcept import plots

        plots.data_grid(spec, np.asarray(x), np.asarray(labels), args.show)
        print(f"wrote {args.show}")
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


def cmd_train(args):
    cfg = _config(args)
    from jaxconcept import sweep

    if args.distributed:  # multi-host (TPU pod, several GPU hosts): every host runs this command
        import jax

        jax.distributed.initialize()
    n = len(C.members(cfg))
    swept = ", ".join(C.swept_fields(cfg)) or "nothing"
    print(f"jaxconcept train: {n} member(s) (sweeping {swept}), {cfg.train.steps} steps -> {args.out}")
    try:
        sweep.train(cfg, args.out, progress=not args.no_progress)
    except sweep.RunError as exc:
        print(f"jaxconcept train: {exc}", file=sys.stderr)
        return 2
    print(f"jaxconcept train: done; next: jaxconcept analyze {args.out}")
    return 0


def cmd_analyze(args):
    from jaxconcept import dynamics, plots, probe, rundir

    try:
        analysis = dynamics.analyze_run(args.run_dir, args.threshold)
    except (rundir.RunDirError, probe.ProbeError) as exc:
        print(f"jaxconcept analyze: {exc}", file=sys.stderr)
        return 2
    figs = plots.all_figures(analysis, args.run_dir)
    print(f"jaxconcept analyze: {len(analysis['members'])} member(s), {len(analysis['steps'])} checkpoints, "
          f"threshold {args.threshold}")
    for m in analysis["members"]:
        for c in analysis["held_out"]:
            name = analysis["class_names"][c]
            lt = ", ".join(f"{k} {'-' if v is None else round(v)}" for k, v in m["learning_time"][name].items())
            t = m["turn"][name]
            turn = f"turn at step {t['step']} ({t['angle']:.0f} deg)" if t["turned"] else "no turn"
            print(f"  member {m['index']} seed {m['seed']} {name}: learning time {lt}; {turn}")
    print(f"jaxconcept analyze: wrote {args.run_dir}/analysis.json and " + ", ".join(str(f) for f in figs))
    return 0


def cmd_elicit(args):
    from jaxconcept import elicit, probe, rundir

    try:
        out = elicit.elicit_run(args.run_dir, args.threshold, concept=args.concept)
    except (rundir.RunDirError, probe.ProbeError) as exc:
        print(f"jaxconcept elicit: {exc}", file=sys.stderr)
        return 2
    for m in out["members"]:
        print(f"member {m['index']}: emergence naive {m['emergence_step']['naive']}, "
              f"overprompting {m['concept']} {m['emergence_step']['over']}, latent {m['emergence_step']['latent']}; "
              f"turn {m['turn_step']}")
    print(f"wrote {args.run_dir}/elicit.json and figures/elicit.png")
    return 0


def cmd_demo(args):
    from jaxconcept import demo

    demo.run(args.out, progress=not args.no_progress, extra_sets=args.sets)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxconcept", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="render a dataset of G (every class) to .npz, optionally a PNG grid")
    _add_config_args(p)
    p.add_argument("--n-per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .npz")
    p.add_argument("--show", default=None, help="output .png grid of examples per class")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("info", help="parameter count and FLOPs per training step of the configured model")
    _add_config_args(p)
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("train", help="train a run or a sweep (lists in sweep fields) into RUN_DIR")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (resumes if it holds the same config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host; run on every host)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("analyze", help="concept-space analysis of a run: analysis.json and figures")
    p.add_argument("run_dir")
    p.add_argument("--threshold", type=float, default=0.8, help="accuracy that counts as learned")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("elicit", help="hidden capabilities: overprompting and latent interventions")
    p.add_argument("run_dir")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--concept", default=None,
                   help="concept to overprompt and steer (default: the weakest concept signal)")
    p.set_defaults(fn=cmd_elicit)

    p = sub.add_parser("demo", help="small CPU sweep: train, analyse, elicit, figures (<= 10 min)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting, e.g. --set 'data.m=[2,0.25]'")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except C.ConfigError as exc:
        print(f"jaxconcept {args.command}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
