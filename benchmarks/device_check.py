"""What one accelerator does with the reference U-Net, measured in one short run.

    python benchmarks/device_check.py --budget-s 165 --out out        # what device_check.sh runs
    python benchmarks/device_check.py --reference /tmp/reference      # + the PyTorch peers
    python benchmarks/device_check.py --tiny --out /tmp/dc            # seconds to minutes, on a CPU
    python benchmarks/device_check.py --merge-strategies out/strategies.json  # commit the winners

Every training configuration is the run's own config (``--config``, default
experiments/colour_sweep_mini.json; ``--tiny`` shrinks it to the tiny U-Net) with only the
member count, dtype, stacking and convolution formulation changed, so its 8-member programs are
the run's and JAX's persistent compilation cache (on, in ``--compile-cache`` or
``$JAX_COMPILATION_CACHE_DIR``) serves ``jaxconcept train`` of the same config afterwards.

Stages, each given a share of the budget (what one leaves passes to the next, so every stage is
reached); DIR/device_check.json is rewritten after each (a run stopped from outside keeps what it
had):

1. ceiling: a large matrix product's TFLOP/s (bf16 on accelerators, float32 on a CPU), the
   denominator of every MFU;
2. FLOPs of one member's training step from the *lowered* program's cost analysis (no compile);
3. train: every program is lowered in priority order on a background thread and compiled side by
   side (``stacking.Farm``) while the run's 8-member init runs once; every stack size reuses that
   state (sliced or repeated), and the stackings are timed against each other: ``vmap``
   (grouped convolutions), ``map/C`` (``lax.map`` over chunks of C vmapped members) and
   ``vmap+explicit`` (``model.conv="explicit"``) for 8, 32, 96 members in bf16, one member,
   and float32 for 1 and 32: model-steps/s, TFLOP/s, MFU, compile s, memory. Rows are timed when
   no training compile is running (XLA autotunes on the device), or when the stage's time
   demands it (``compiles_in_flight`` says so);
4. torch: ``torch_ensemble.py`` (``--reference``), started after the ceiling so that its models
   build and compile beside ours (on a CPU at its own stage, one thread, without torch.compile),
   times the reference's own one-model PyTorch step and functorch ensembles of the same members
   (bf16 autocast, ``torch.compile``) once ours are timed;
5. sampler: the run's ``evaluate`` program (50-step sampler for every class, held-back losses)
   for its 8 members;
6. sd: Stable Diffusion 1.x at 512 px with random weights (``sd_bench.py``), compiled ahead in
   the background.

The fastest stacking per (device kind, architecture, stack size) goes to DIR/strategies.json, in
the form of the table ``train.strategy="auto"`` reads (jaxconcept/train/strategies.json, shipped in the
package; benchmarks/check_report.py describes it); ``--merge-strategies`` merges it there.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import check_stages  # noqa: E402
from check_report import Budget, Report, merge_strategies  # noqa: E402

SCHEMA = 2
RUN_CONFIG = HERE.parent / "experiments" / "colour_sweep_mini.json"
PACKAGE_TABLE = HERE.parent / "jaxconcept" / "train" / "strategies.json"
# --tiny: the run's config with 2 members on the tiny preset's U-Net and data sizes (device_check.sh
# passes the same to `jaxconcept train`, so that the dry run shares its compiled programs as a real
# run does)
TINY_SETS = ["data.sep_col=[0.2,0.8]", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
             "model.num_heads=2", "model.norm_groups=4", "model.time_embed_dim=16", "model.embed_dim=32",
             "data.image_size=16", "data.n_per_class=32", "train.batch_size=8", "train.steps_per_call=5",
             "train.steps=40", "train.checkpoint_every=20", "eval.n_points=2", "eval.first=10", "eval.n_samples=4",
             "eval.sampler_steps=4"]
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0"
SHARES = {"train": 55, "torch": 15, "sampler": 5, "sd": 25}  # of what the ceiling and FLOPs leave


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=165.0, help="wall-clock budget, compiles included")
    ap.add_argument("--out", default="runs/device_check", help="directory for device_check.json, strategies.json")
    ap.add_argument("--config", default=str(RUN_CONFIG), help="the run whose shapes are measured")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config overrides KEY=VALUE")
    ap.add_argument("--tiny", action="store_true", help="the run's config on the tiny U-Net: a CPU dry run")
    ap.add_argument("--members", default=None, help="stack sizes (default 1,8,32,96; tiny 2)")
    ap.add_argument("--fp32-members", default=None,
                    help="those of --members also timed in float32, one stacking (1,32; tiny none)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="the first: every stacking; the rest: vmap only")
    ap.add_argument("--map-chunks", default=None, help="lax.map chunk sizes to try below the stack size (1,8,32; "
                    "tiny none)")
    ap.add_argument("--no-compare", action="store_true", help="one stacking per size (the engine's default)")
    ap.add_argument("--measure-s", type=float, default=None, help="timed seconds per measurement (2; tiny 0.2)")
    ap.add_argument("--workers", type=int, default=None, help="compiles side by side (default: CPU count)")
    ap.add_argument("--reference", default=None, help="a checkout of the reference: the PyTorch peers")
    ap.add_argument("--torch-members", default=None, help="functorch ensemble sizes (32,8,96 if measured; tiny 2)")
    ap.add_argument("--torch-compile", choices=("auto", "yes", "no"), default="auto",
                    help="torch.compile the ensembles (auto: on accelerators; CPU inductor compiles take minutes)")
    ap.add_argument("--no-sampler", action="store_true")
    ap.add_argument("--no-sd", action="store_true", help="skip the Stable Diffusion stage")
    ap.add_argument("--sd-dtypes", default=None, help="SD dtypes in order (bfloat16,float32; tiny float32)")
    ap.add_argument("--sd-size", type=int, default=None, help="SD image size in pixels (512; tiny 32)")
    ap.add_argument("--sd-batch", type=int, default=None, help="SD images per sampler call (4; tiny 1)")
    ap.add_argument("--sd-steps", type=int, default=None, help="SD DDIM steps (50; tiny 2)")
    ap.add_argument("--matmul-n", type=int, default=None, help="ceiling matrix size (8192 on accelerators)")
    ap.add_argument("--compile-cache", default=None, help="persistent compilation cache (default: the CLI's)")
    ap.add_argument("--no-compile-cache", action="store_true")
    ap.add_argument("--run-args", action="store_true", help="print the `jaxconcept train` arguments of the run "
                    "these shapes match (with --tiny: the tiny overrides) and exit")
    ap.add_argument("--merge-strategies", metavar="FILE", default=None,
                    help="merge a check's strategies.json into the package's table and exit")
    ap.add_argument("--into", default=str(PACKAGE_TABLE), help="the table --merge-strategies writes")
    a = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v] if s else []  # noqa: E731
    try:
        a.members = ints(a.members or ("2" if a.tiny else "1,8,32,96"))
        a.fp32_members = ints(a.fp32_members if a.fp32_members is not None else ("" if a.tiny else "1,32"))
        a.map_chunks = ints(a.map_chunks if a.map_chunks is not None else ("" if a.tiny else "1,8,32"))
        a.torch_members = ints(a.torch_members) or None
    except ValueError:
        ap.error("--members, --fp32-members, --map-chunks, --torch-members: comma-separated positive integers")
    if not a.members or min(a.members + a.fp32_members + a.map_chunks + (a.torch_members or [1])) < 1:
        ap.error("--members, --fp32-members, --map-chunks, --torch-members: comma-separated positive integers")
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.sd_dtypes = [d for d in (a.sd_dtypes or ("float32" if a.tiny else "bfloat16,float32")).split(",") if d]
    for d in a.dtypes + a.sd_dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtypes/--sd-dtypes: {d!r} is not one of float32, bfloat16")
    a.measure_s = a.measure_s if a.measure_s is not None else (0.2 if a.tiny else 2.0)
    a.sd_size, a.sd_batch = a.sd_size or (32 if a.tiny else 512), a.sd_batch or (1 if a.tiny else 4)
    a.sd_steps = a.sd_steps or (2 if a.tiny else 50)
    a.all_sets = (TINY_SETS if a.tiny else []) + list(a.sets)
    return a


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _compile_cache(a):
    """JAX's persistent compilation cache for this process, as the CLI sets it for its commands
    (every program, however fast it compiled): the run after this check reads what it wrote."""
    import jax

    from jaxconcept import cli

    if a.no_compile_cache:
        return None
    path = str(a.compile_cache or cli.default_compile_cache())
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # the same size limit as the CLI: a limited cache keeps access times beside its entries, and a
    # process with a limit fails to write to a directory whose entries were written without one
    jax.config.update("jax_compilation_cache_max_size", cli.COMPILE_CACHE_MAX_BYTES)
    return path


class Check:
    """The stages of one run, sharing the budget, the report and what earlier stages measured."""

    def __init__(self, a):
        import jax

        from jaxconcept import config as C

        self.a, self.jax = a, jax
        self.cache_dir = _compile_cache(a)
        self.budget = Budget(a.budget_s, reserve_s=1.0 if a.tiny else 5.0)
        self.backend = jax.default_backend()
        self.accel = self.backend != "cpu"
        self.devices = jax.devices()[:1]  # figures are per chip: one device against its own ceiling
        self.base = C.resolve(None, a.config, a.all_sets)
        self.run_members = len(C.members(self.base))
        dev = self.devices[0]
        self.cache_events = check_stages.count_cache_events()
        mc = self.base.model
        head = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "commit": _commit(), "argv": list(a.argv), "budget_s": a.budget_s, "tiny": a.tiny,
                "device": {"backend": self.backend, "kind": dev.device_kind, "count": len(jax.devices()), "used": 1,
                           "jax": jax.__version__, "python": platform.python_version(), "host": platform.machine(),
                           "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
                "config": {"file": a.config, "sets": a.all_sets, "name": self.base.name, "arch": mc.arch,
                           "run_members": self.run_members, "batch_size": self.base.train.batch_size,
                           "n_per_class": self.base.data.n_per_class, "steps_per_call": self.base.train.steps_per_call,
                           "image_size": getattr(self.base.data, "image_size", None), "ch": mc.ch,
                           "ch_mult": list(mc.ch_mult), "num_res_blocks": mc.num_res_blocks},
                "compile_cache": self.cache_dir}
        self.rep = Report(a.out, self.budget, head, SCHEMA)
        print(f"device_check: {dev.device_kind} ({self.backend}, {len(jax.devices())} device(s), 1 used), jax "
              f"{jax.__version__}; {self.base.name or a.config} ({mc.arch}, batch {self.base.train.batch_size}, K "
              f"{self.base.train.steps_per_call}); budget {a.budget_s:.0f} s; compile cache {self.cache_dir}",
              flush=True)
        self.rep.write()

    def run(self) -> dict:
        st = check_stages.Stages(self)
        order = [("ceiling", None), ("flops", None)] + list(SHARES.items())
        for i, (name, share) in enumerate(order):
            if name == "train":
                st.start_background()  # after the ceiling: its matmuls are timed on a quiet device
            t = time.perf_counter()
            deadline = self.budget.deadline(share, [s for _, s in order[i + 1:]]) if share else None
            try:
                getattr(st, name)(deadline)
            except Exception as exc:  # noqa: BLE001 - a broken stage is reported; the next one still runs
                self.rep.error(name, exc)
            self.rep.data["stages"][name] = {"wall_s": round(time.perf_counter() - t, 3), "allotted_s":
                                             None if deadline is None else round(deadline - t, 3)}
            self.rep.write()
        st.finish()
        self.rep.data["compile_cache_events"] = dict(self.cache_events)
        self.rep.data["complete"] = True
        self.rep.write()
        print(f"wrote {self.rep.path} ({self.budget.elapsed():.1f} s of {self.a.budget_s:.0f})", flush=True)
        return self.rep.data


def run_args(a) -> list[str]:
    """`jaxconcept train` arguments for the run these shapes match."""
    return ["--config", a.config] + [w for s in a.all_sets for w in ("--set", s)]


def main(argv=None) -> dict | None:
    """Run the check; returns what was written to DIR/device_check.json."""
    a = parse(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.run_args:
        print(" ".join(run_args(a)))
        return None
    if a.merge_strategies:
        try:
            n = merge_strategies(a.merge_strategies, a.into)
        except ValueError as exc:
            print(f"device_check: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"device_check: {a.into} now holds {n} entries")
        return None
    # JAX allocates on demand here: the PyTorch peers share the device with this process
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    flags = os.environ.get("XLA_FLAGS", "")
    if a.tiny and "jax" not in sys.modules and "optimization_level" not in flags:
        # the tiny networks compile longer than they run: XLA's backend optimisations off (the
        # compilation cache keys on XLA_FLAGS: device_check.sh --tiny exports the same for the run)
        os.environ["XLA_FLAGS"] = (flags + " " + TINY_XLA_FLAGS).strip()
    return Check(a).run()


if __name__ == "__main__":
    code = 0
    try:
        main()
    except KeyboardInterrupt:
        code = 130
    except Exception:  # noqa: BLE001 - the JSON written so far stays; say what broke
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # compiles still running in the background are abandoned, not waited for
