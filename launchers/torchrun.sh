#!/usr/bin/env bash
# Local multi-GPU (or multi-process CPU) run under torchrun.
#
#   launchers/torchrun.sh 4 experiment=mnist data.root=/data      # 4 processes on this machine
#
# torchrun starts NPROC workers and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
# MASTER_PORT; `runner=torchrun` makes igniter join that process group (nccl on GPUs,
# gloo on CPU). data.loader.batch_size stays the *global* batch: each worker gets
# batch_size / NPROC. Add --max-restarts=N to have torchrun restart failed workers.
set -euo pipefail
NPROC="${1:?usage: $0 NPROC [igniter overrides...]}"
shift
if [ -z "${OMP_NUM_THREADS+set}" ]; then
  # igniter gives every worker its threads itself (usable cores / processes). torchrun would set
  # OMP_NUM_THREADS=1 and print a 4-line banner about it: this placeholder keeps it quiet, and
  # IGNITER_OMP_PLACEHOLDER tells igniter that the 1 is not yours (an OMP_NUM_THREADS you export is)
  export OMP_NUM_THREADS=1 IGNITER_OMP_PLACEHOLDER=1
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m igniter runner=torchrun "$@"
