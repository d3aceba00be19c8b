#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for tests and local trials.
#
#   slurm/start_cluster.sh STATE_DIR [CPUS]
#   export SLURM_CONF=STATE_DIR/slurm.conf      # every client (sbatch, squeue, sacct, submitit) needs it
#   ...
#   slurm/stop_cluster.sh STATE_DIR
#
# Needs root and Debian's packages: slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# (slurm/install_debian.sh). Starts, in order: munged, MariaDB (127.0.0.1:3306), slurmdbd
# (accounting, so sacct and submitit know job states), slurmctld, slurmd. Everything
# (configs, sockets, state, logs) lives under STATE_DIR. Declares CPUS (default 8) CPUs on
# the node, more than this machine may have, so 2-task jobs run on 2 cores. Ports 6817-6819
# and 3306 are fixed: one cluster per machine at a time. Exits non-zero with the failing
# daemon's log tail if the cluster does not come up within 30 s.
set -euo pipefail
STATE="$(realpath -m "${1:?usage: $0 STATE_DIR [CPUS]}")"
CPUS="${2:-8}"
HOST="$(hostname -s)"
mkdir -p "$STATE"/{munge,mysql,spool,state,log,run}
chmod 755 "$STATE" "$STATE/munge"   # the munge socket's directory must be o+x
MUNGE_SOCKET="$STATE/munge/munge.socket"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

fail() {
  echo "start_cluster: $1" >&2
  for f in "$STATE"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
  exit 1
}

wait_for() {  # wait_for DESCRIPTION COMMAND...
  local what="$1"; shift
  for _ in $(seq 1 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "$what did not come up"
}

# --- munge --------------------------------------------------------------------------------
[ -f "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key" --force 2>/dev/null \
  || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
  --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
wait_for munged sh -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"

# --- MariaDB (accounting storage for slurmdbd) ---------------------------------------------
if [ ! -d "$STATE/mysql/mysql" ]; then
  mariadb-install-db --datadir="$STATE/mysql" --user=root --auth-root-authentication-method=normal \
    >"$STATE/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed"
fi
mariadbd --datadir="$STATE/mysql" --user=root --bind-address=127.0.0.1 --port=3306 \
  --socket="$STATE/run/mysql.sock" --pid-file="$STATE/run/mariadbd.pid" \
  --log-error="$STATE/log/mariadbd.log" --skip-name-resolve &
wait_for MariaDB mariadb --socket="$STATE/run/mysql.sock" -u root -e "SELECT 1"
mariadb --socket="$STATE/run/mysql.sock" -u root -e \
  "CREATE USER IF NOT EXISTS 'slurm'@'%' IDENTIFIED BY 'slurm'; GRANT ALL ON *.* TO 'slurm'@'%'; FLUSH PRIVILEGES;"

# --- configs --------------------------------------------------------------------------------
cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
chmod 600 "$STATE/slurmdbd.conf"

cat >"$STATE/slurm.conf" <<EOF
ClusterName=igniter
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CryptoType=crypto/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=5
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
MpiDefault=none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$STATE/slurm.conf"

# --- daemons --------------------------------------------------------------------------------
slurmdbd   # reads slurmdbd.conf beside $SLURM_CONF
wait_for slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
slurmctld -i -f "$SLURM_CONF"
wait_for slurmctld timeout 5 scontrol ping
slurmd -f "$SLURM_CONF"
wait_for "slurmd (node idle)" sh -c "timeout 5 sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'"
echo "SLURM is up: export SLURM_CONF=$SLURM_CONF"
