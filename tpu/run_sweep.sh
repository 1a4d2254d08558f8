#!/usr/bin/env bash
# Run a jaxconcept sweep on every worker of a TPU VM or pod slice.
# usage: tpu/run_sweep.sh TPU_NAME ZONE CONFIG.json RUN_DIR [extra jaxconcept train args...]
set -euo pipefail
name=$1 zone=$2 config=$3 out=$4; shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":~/jaxconcept --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; cd ~/jaxconcept
  pip install -q -U 'jax[tpu]' && pip install -q -e '.[gcs]'
  jaxconcept train --distributed --no-progress --config $config --out $out $*
"
