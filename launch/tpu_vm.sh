#!/bin/bash
# Runs the same training command on every worker of a Cloud TPU VM (single host or pod
# slice). Each worker gets the project in ~/reid_jax and its virtualenv in
# ~/reid_jax/.venv (created, and the requirements installed, on every launch; pip skips
# what is already there), then all start together; JAX finds the other workers through
# jax.distributed.initialize() (REID_JAX_DISTRIBUTED=1, read from the TPU metadata).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/dare.py gs://bucket/runs/dare_r50 [train flags...]
#
# What it expects:
# - gcloud configured for the TPU's project, run from any checkout of this repository;
#   only the project's own files are copied (git-tracked and untracked-but-not-ignored
#   ones; without git, everything but .git, .venv and runs);
# - the workdir on a bucket (gs://...) or a disk every worker sees, and TFDS_DATA_DIR
#   (read here, default the workers' ~/tensorflow_datasets) on a bucket holding the
#   prepared datasets, since every worker reads its slice of each batch itself.
# Re-running the same command resumes from the workdir's newest complete checkpoint.
# Each worker also appends its output to ~/reid_jax_train.log.
# Where JAX cannot read the cluster from the TPU metadata, give every worker
# REID_JAX_COORDINATOR=HOST0:PORT, REID_JAX_NUM_PROCESSES=N and REID_JAX_PROCESS_ID=I
# in its environment (they replace auto-detection; tests/fake_cluster/gcloud does so
# for the fake workers with which tests/test_launch.py runs this script).
set -euo pipefail
USAGE="usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [train flags...]"
TPU=${1:?$USAGE}
ZONE=${2:?$USAGE}
CONFIG=${3:?$USAGE}
WORKDIR=${4:?$USAGE}
shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
# The train command and the data folder, quoted for the workers' shell.
TRAIN=$(printf ' %q' .venv/bin/python -m reid_jax.train --config="$CONFIG" \
        --workdir="$WORKDIR" "$@")
DATA=${TFDS_DATA_DIR:+$(printf '%q' "$TFDS_DATA_DIR")}

# Stage the project's files as reid_jax/ and copy that into ~ (scp -r merges it into an
# existing ~/reid_jax, keeping the workers' .venv).
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir "$STAGE/reid_jax"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -co --exclude-standard | while IFS= read -r f; do
     if [[ -f "$f" ]]; then printf '%s\n' "$f"; fi  # not files deleted since the last commit
   done | tar -cf - -T -) | tar -xf - -C "$STAGE/reid_jax"
else
  (cd "$REPO" && tar -cf - --exclude=./.git --exclude=./.venv --exclude=./runs .) |
    tar -xf - -C "$STAGE/reid_jax"
fi

gcloud compute tpus tpu-vm scp --recurse "$STAGE/reid_jax" "$TPU":~ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/reid_jax
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'
"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -eo pipefail
  cd ~/reid_jax
  export REID_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 TFDS_DATA_DIR=${DATA:-\$HOME/tensorflow_datasets}
 $TRAIN 2>&1 | tee -a ~/reid_jax_train.log
"
