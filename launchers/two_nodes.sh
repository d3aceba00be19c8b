#!/usr/bin/env bash
# Two machines, NPROC processes each, without a scheduler. Run on every node:
#
#   node 0 (address 10.0.0.1):  launchers/two_nodes.sh 0 10.0.0.1 2 experiment=mnist data.root=/data output_dir=/shared/run1
#   node 1:                     launchers/two_nodes.sh 1 10.0.0.1 2 experiment=mnist data.root=/data output_dir=/shared/run1
#
# Arguments: NODE_RANK MASTER_ADDR NPROC [overrides]. MASTER_PORT (default 29500) must
# be the same on both nodes and open between them. Set GLOO_SOCKET_IFNAME /
# NCCL_SOCKET_IFNAME to the interface that reaches the other node if it is not the
# default route. With output_dir on a shared file system all ranks write into one
# run directory; otherwise node 1 keeps only its own rank logs.
#
# The torchrun equivalent (elastic rendezvous, restarts):
#   torchrun --nnodes 2 --node-rank NODE_RANK --nproc-per-node NPROC \
#            --master-addr MASTER_ADDR --master-port 29500 -m igniter runner=torchrun ...
set -euo pipefail
NODE_RANK="${1:?usage: $0 NODE_RANK MASTER_ADDR NPROC [overrides...]}"
MASTER_ADDR="${2:?master address (node 0)}"
NPROC="${3:?processes per node}"
shift 3
exec igniter runner=spawn runner.nnodes=2 runner.node_rank="$NODE_RANK" \
  runner.master_addr="$MASTER_ADDR" runner.master_port="${MASTER_PORT:-29500}" \
  runner.nproc_per_node="$NPROC" "$@"
