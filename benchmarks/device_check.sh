#!/usr/bin/env bash
# The one script to run on a lent accelerator (or your own GPU): TOTAL_S (540 s = 9 min) of wall
# clock from a cold machine, compiles included, every stage reached, a failed stage never stopping
# the next, and its results in at most 5 files.
#
#   1. benchmarks/device_check.py for CHECK_S (what TOTAL_S leaves after TRAIN_S, ANALYZE_S and
#      SLACK_S): the matmul ceiling, FLOPs per model-step from the lowered program, the stacked
#      training of 1/8/32/96 members (vmap, lax.map chunks, vmap of the explicit convolutions; bf16,
#      and fp32 for 1 and 32), the PyTorch peers when REFERENCE names a checkout of the reference
#      (its own step, and functorch ensembles with torch.compile), the run's evaluation program and
#      Stable Diffusion 1.x at 512 px. Its shapes are the run's: it leaves the run's programs in
#      JAX's persistent compilation cache;
#   2. jaxconcept train --config $CONFIG to its end or for what is left less ANALYZE_S (stopped by
#      `timeout`; training resumes where it stopped if re-run); the seconds to its first metric and
#      the programs it had to compile (new cache entries) are logged;
#   3. jaxconcept analyze on the evaluation points written.
#
# What comes back in $OUT: log.txt (everything printed), device_check.json (every figure),
# strategies.json (the fastest stacking per stack size: `python benchmarks/device_check.py
# --merge-strategies $OUT/strategies.json` puts it in the package's table), run.tar.gz (the run's
# metrics.jsonl, analysis.json, members.json, config and figures). Checkpoints stay in $RUN_DIR.
#
#   bash benchmarks/device_check.sh                                    # OUT=./out
#   OUT=/tmp/dc REFERENCE=/tmp/reference bash benchmarks/device_check.sh
#   TINY=1 OUT=/tmp/dc bash benchmarks/device_check.sh     # a CPU dry run of every stage (~5 min)
#
# Settings (environment): OUT (./out), RUN_DIR (/tmp/jaxconcept_colour_sweep_mini[_tiny]), TOTAL_S
# (540; tiny 900, a bound: stages end when their work is done), TRAIN_S (300, the run's target;
# tiny 100), ANALYZE_S (60; tiny 180), SLACK_S (15: process starts and packing), CONFIG
# (experiments/colour_sweep_mini.json), TINY (1: the run's config with 2 members on the tiny U-Net,
# XLA's backend optimisations off), CHECK_ARGS and TRAIN_ARGS (extra arguments, word-split),
# REFERENCE, PYTHON (python3), JAX_COMPILATION_CACHE_DIR (/tmp/jaxconcept_jax_cache: the check and
# the run share it).
set -u

cd "$(dirname "$0")/.." || exit 2
TINY=${TINY:-0}
OUT=${OUT:-./out}
CONFIG=${CONFIG:-experiments/colour_sweep_mini.json}
CHECK_ARGS=${CHECK_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
REFERENCE=${REFERENCE:-}
PY=${PYTHON:-python3}
if [ "$TINY" = 1 ]; then
    RUN_DIR=${RUN_DIR:-/tmp/jaxconcept_colour_sweep_mini_tiny}
    TOTAL_S=${TOTAL_S:-900}; TRAIN_S=${TRAIN_S:-100}; ANALYZE_S=${ANALYZE_S:-180}
    CHECK_ARGS="--tiny $CHECK_ARGS"
    # the check's and the run's programs are compiled with the same flags, so the cache serves both
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
else
    RUN_DIR=${RUN_DIR:-/tmp/jaxconcept_colour_sweep_mini}
    TOTAL_S=${TOTAL_S:-540}; TRAIN_S=${TRAIN_S:-300}; ANALYZE_S=${ANALYZE_S:-60}
fi
SLACK_S=${SLACK_S:-15}
CHECK_S=$(( TOTAL_S - TRAIN_S - ANALYZE_S - SLACK_S ))

mkdir -p "$OUT" || exit 2
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(date +%s) + START )); }
stage() { echo; echo "=== [$(elapsed) s] $*"; }
status() {  # status NAME RC: log how a stage ended
    if [ "$2" -eq 0 ]; then echo "=== [$(elapsed) s] $1: ok"
    elif [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then echo "=== [$(elapsed) s] $1: stopped by its time limit (rc $2)"
    else echo "=== [$(elapsed) s] $1: FAILED (rc $2); going on"; fi
}
cache_list() { ls "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null | sort; }

# The repository's package without installing it; the JAX compilation cache outside $OUT.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxconcept_jax_cache}
export JAXCONCEPT_CACHE=${JAXCONCEPT_CACHE:-/tmp/jaxconcept_probes}
mkdir -p "$JAX_COMPILATION_CACHE_DIR" "$JAXCONCEPT_CACHE"

main() {
    stage "device_check.sh: OUT=$OUT RUN_DIR=$RUN_DIR TOTAL_S=$TOTAL_S CHECK_S=$CHECK_S TRAIN_S=$TRAIN_S ANALYZE_S=$ANALYZE_S"
    date -u
    git log -1 --format='commit %H %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    echo "XLA_FLAGS=${XLA_FLAGS:-}; compile cache $JAX_COMPILATION_CACHE_DIR: $(cache_list | wc -l) entries"

    # 1. the device check (its own budget; `timeout` only as a backstop)
    stage "1/3 device_check (budget ${CHECK_S} s)"
    ref=()
    [ -n "$REFERENCE" ] && ref=(--reference "$REFERENCE")
    # shellcheck disable=SC2086  # CHECK_ARGS is word-split on purpose
    timeout --kill-after=10 $(( CHECK_S + 30 )) $PY benchmarks/device_check.py --budget-s "$CHECK_S" --out "$OUT" \
        --config "$CONFIG" ${ref[@]+"${ref[@]}"} $CHECK_ARGS
    status device_check $?

    # 2. the run, with the check's shapes, to its end or for what is left less the analysis' share
    # shellcheck disable=SC2086
    run_args=$($PY benchmarks/device_check.py --run-args --config "$CONFIG" $CHECK_ARGS)
    train_s=$(( $(left) - ANALYZE_S - 5 ))
    stage "2/3 train ($run_args) for at most ${train_s} s"
    if [ "$train_s" -gt 10 ]; then
        before=$(mktemp)
        cache_list > "$before"
        t0=$(date +%s)
        ( while [ ! -s "$RUN_DIR/metrics.jsonl" ]; do sleep 1; done
          echo "=== [$(elapsed) s] train: first metric $(( $(date +%s) - t0 )) s after the run started" ) &
        watcher=$!
        # shellcheck disable=SC2086
        timeout --kill-after=15 "$train_s" $PY -m jaxconcept train $run_args --out "$RUN_DIR" --no-progress \
            $TRAIN_ARGS
        status train $?
        kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
        new=$(comm -13 "$before" <(cache_list) | grep -- '-cache$' | sed -E 's/-[0-9a-f]{64}-cache$//' | sort | uniq -c \
              | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')
        rm -f "$before"
        echo "=== programs the run compiled (not in the cache): ${new:-none}"
        echo "=== $(wc -l < "$RUN_DIR/metrics.jsonl" 2>/dev/null || echo 0) metric records; the last:"
        tail -n 1 "$RUN_DIR/metrics.jsonl" 2>/dev/null | cut -c1-400
    else
        echo "=== skipped: only $(left) s left"
    fi

    # 3. analysis of what was written
    analyze_s=$(( $(left) - 5 ))
    stage "3/3 analyze $RUN_DIR (${analyze_s} s)"
    if [ "$analyze_s" -gt 10 ] && ls "$RUN_DIR"/samples/step_*.npz >/dev/null 2>&1; then
        timeout --kill-after=10 "$analyze_s" $PY -m jaxconcept analyze "$RUN_DIR"
        status analyze $?
    else
        echo "=== skipped: $(left) s left, or no evaluation samples in $RUN_DIR/samples"
    fi

    # what comes back: few, small files
    files=()
    for f in metrics.jsonl analysis.json members.json config.json figures; do
        [ -e "$RUN_DIR/$f" ] && files+=("$f")
    done
    if [ ${#files[@]} -gt 0 ]; then tar -czf "$OUT/run.tar.gz" -C "$RUN_DIR" "${files[@]}"; fi
    stage "done in $(elapsed) s of $TOTAL_S; in $OUT:"
    ls -la "$OUT"
}

main 2>&1 | tee -a "$OUT/log.txt"  # the pipeline waits for tee: the log is whole when the script ends
exit 0
