#!/bin/bash
# Runs the same training command on every worker of a Cloud TPU VM (single host or pod
# slice). Each worker installs the project once, then all start together; JAX finds
# the other workers through jax.distributed.initialize() (REID_JAX_DISTRIBUTED=1).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/dare.py gs://bucket/runs/dare_r50 [train flags...]
#
# The repository is copied to ~/reid_jax on every worker. TFDS_DATA_DIR should point at
# a bucket (gs://...) or a disk every worker sees, holding the prepared datasets.
set -euo pipefail
TPU=${1:?usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [train flags...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
EXTRA="$*"
REPO=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse "$REPO" "$TPU":~/reid_jax --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/reid_jax
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'
"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/reid_jax
  export REID_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 TFDS_DATA_DIR=${TFDS_DATA_DIR:-\$HOME/tensorflow_datasets}
  .venv/bin/python -m reid_jax.train --config=$CONFIG --workdir=$WORKDIR $EXTRA 2>&1 | tee -a ~/reid_jax_train.log
"
