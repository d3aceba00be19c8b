#!/usr/bin/env bash
# Multi-node igniter job with plain sbatch + srun (no Hydra launcher). Copy, edit the
# #SBATCH lines and the overrides, then:  sbatch slurm/sbatch_template.sh
#
# One SLURM task per process: --ntasks-per-node = runner.nproc_per_node = GPUs per node.
# srun starts the tasks; runner=slurm makes each task join the process group from SLURM's
# variables (rank = SLURM_PROCID, master = first host of the node list, port derived from
# the job id). Do not call igniter without srun here: the tasks would never meet.
#SBATCH --job-name=igniter
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR2@120          # igniter checkpoints and requeues on this warning
#SBATCH --requeue
#SBATCH --open-mode=append         # a requeued job appends to the same log
#SBATCH --output=igniter-%j.out
set -euo pipefail

NODES="${SLURM_JOB_NUM_NODES:-2}"
PER_NODE="${SLURM_NTASKS_PER_NODE:-4}"
# A fixed run directory per job: a requeued job resumes from its checkpoints (resume=auto).
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-igniter}-${SLURM_JOB_ID:-local}}"

srun --kill-on-bad-exit=1 igniter runner=slurm runner.nnodes="$NODES" runner.nproc_per_node="$PER_NODE" \
  output_dir="$RUN_DIR" "$@"
