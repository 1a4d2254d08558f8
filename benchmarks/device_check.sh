#!/usr/bin/env bash
# The one script to run on a lent accelerator (or your own GPU): at most about 8 minutes of wall
# clock, every stage logged, a failed stage never stopping the next.
#
#   1. benchmarks/device_check.py with a 4-minute budget: the device's matmul ceiling, the
#      reference U-Net's stacked training step (1/8/32 members x vmap/map x bf16/fp32), the
#      sampler, the PyTorch reference's step when REFERENCE names a checkout of it, and (if time
#      is left) Stable Diffusion 1.x sampling at full size with random weights (CHECK_ARGS=--no-sd
#      skips it; benchmarks/sd_bench.py runs it alone);
#   2. jaxconcept train --config experiments/colour_sweep_mini.json for what time is left, less
#      what analysis needs (stopped by `timeout`; training resumes where it stopped if re-run);
#   3. jaxconcept analyze on the evaluation points written so far.
#
# Everything printed goes to $OUT/log.txt as well as the terminal; device_check.json and the
# run's analysis.json, metrics.jsonl and figures (PNG) are copied into $OUT (few files, small).
# The run itself (checkpoints: about 1 GB each) stays in $RUN_DIR.
#
#   bash benchmarks/device_check.sh                                   # OUT=./out
#   OUT=/tmp/dc REFERENCE=/tmp/reference bash benchmarks/device_check.sh
#
# Settings (environment): OUT (./out), RUN_DIR (/tmp/jaxconcept_colour_sweep_mini), TOTAL_S
# (480: the whole script), CHECK_S (240: device_check's budget), ANALYZE_S (150: kept back for
# analysis), CONFIG (experiments/colour_sweep_mini.json), CHECK_ARGS and TRAIN_ARGS (extra
# arguments, word-split: e.g. CHECK_ARGS="--tiny" TRAIN_ARGS="--set train.steps=40" for a CPU
# smoke run), REFERENCE, PYTHON (python3), JAX_COMPILATION_CACHE_DIR (/tmp/jaxconcept_jax_cache).
set -u

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-./out}
RUN_DIR=${RUN_DIR:-/tmp/jaxconcept_colour_sweep_mini}
TOTAL_S=${TOTAL_S:-480}
CHECK_S=${CHECK_S:-240}
ANALYZE_S=${ANALYZE_S:-150}
CONFIG=${CONFIG:-experiments/colour_sweep_mini.json}
CHECK_ARGS=${CHECK_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
REFERENCE=${REFERENCE:-}
PY=${PYTHON:-python3}

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

# The repository's package without installing it; the JAX compilation cache outside $OUT.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxconcept_jax_cache}
export JAXCONCEPT_CACHE=${JAXCONCEPT_CACHE:-/tmp/jaxconcept_probes}
mkdir -p "$JAX_COMPILATION_CACHE_DIR" "$JAXCONCEPT_CACHE"

main() {
    stage "device_check.sh: OUT=$OUT RUN_DIR=$RUN_DIR TOTAL_S=$TOTAL_S CHECK_S=$CHECK_S ANALYZE_S=$ANALYZE_S"
    date -u
    git log -1 --format='commit %H %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    $PY -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1

    # 1. the device check (its own budget; `timeout` only as a backstop)
    stage "1/3 device_check (budget ${CHECK_S} s)"
    ref=()
    [ -n "$REFERENCE" ] && ref=(--reference "$REFERENCE")
    # shellcheck disable=SC2086  # CHECK_ARGS is word-split on purpose
    timeout --kill-after=10 $(( CHECK_S + 60 )) $PY benchmarks/device_check.py --budget-s "$CHECK_S" --out "$OUT" \
        ${ref[@]+"${ref[@]}"} $CHECK_ARGS
    status device_check $?

    # 2. the mini colour sweep, for what is left less the analysis' share
    train_s=$(( $(left) - ANALYZE_S ))
    stage "2/3 train $CONFIG for ${train_s} s"
    if [ "$train_s" -gt 30 ]; then
        # shellcheck disable=SC2086
        timeout --kill-after=15 "$train_s" $PY -m jaxconcept train --config "$CONFIG" --out "$RUN_DIR" --no-progress \
            $TRAIN_ARGS
        status train $?
    else
        echo "=== skipped: only $(left) s left"
    fi
    tail -n 3 "$RUN_DIR/metrics.jsonl" 2>/dev/null | cut -c1-400

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
    for f in analysis.json metrics.jsonl; do [ -f "$RUN_DIR/$f" ] && cp "$RUN_DIR/$f" "$OUT/"; done
    if ls "$RUN_DIR"/figures/*.png >/dev/null 2>&1; then mkdir -p "$OUT/figures" && cp "$RUN_DIR"/figures/*.png "$OUT/figures/"; fi
    stage "done in $(elapsed) s; in $OUT:"
    ls -la "$OUT" "$OUT/figures" 2>/dev/null
}

main 2>&1 | tee -a "$OUT/log.txt"  # the pipeline waits for tee: the log is whole when the script ends
exit 0
