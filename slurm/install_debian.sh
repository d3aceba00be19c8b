#!/usr/bin/env bash
# Debian packages for a local single-node SLURM (SLURM 22.05 on Debian 12), as root.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
