#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine: munge, MariaDB + slurmdbd (accounting, so
# sacct and job states work), slurmctld and slurmd, with one default partition holding this host.
#
#   sudo bash scripts/slurm-up.sh          # idempotent: re-running keeps what already runs
#   sudo bash scripts/slurm-down.sh        # stop it again
#
# Debian/Ubuntu, run as root. No systemd needed: daemons are started by hand (containers, CI).
# Knobs (environment): SLURM_CLUSTER (default distill), SLURM_PARTITION (default local),
# SLURM_GPUS (default: count of `nvidia-smi -L`), SLURM_UP_TIMEOUT seconds (default 60).
set -euo pipefail

CLUSTER=${SLURM_CLUSTER:-distill}
PARTITION=${SLURM_PARTITION:-local}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
HOST=$(hostname -s)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

die() { echo "slurm-up: error: $*" >&2; exit 1; }
log() { echo "slurm-up: $*"; }

[[ $EUID -eq 0 ]] || die "run as root (it installs packages and starts daemons), e.g. sudo bash $0"
command -v apt-get >/dev/null || die "needs a Debian/Ubuntu system with apt-get"

# ---------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
    || die "apt-get install ${missing[*]} failed"
fi

# ---------------------------------------------------------------- helpers
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }   # pid file -> process still there?

stop_pidfile() {  # stop the daemon of one pid file (TERM, then KILL after 10 s)
  local pid
  alive "$1" || return 0
  pid=$(cat "$1")
  kill -TERM "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
  local secs=$1 what=$2; shift 2
  for _ in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

fail_with_logs() {
  echo "slurm-up: error: $1" >&2
  for f in "${@:2}"; do
    [[ -f $f ]] && { echo "---- last lines of $f" >&2; tail -n 20 "$f" >&2; }
  done
  exit 1
}

install_if_changed() {  # install_if_changed NEW DEST MODE -> returns 0 if DEST changed
  if [[ -f $2 ]] && cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
  install -m "$3" "$1" "$2"; rm -f "$1"; return 0
}

mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd

# ---------------------------------------------------------------- slurm.conf for this host
# (first: sacctmgr and the daemons all read it)
CPUS=$(nproc)
MEM_MIB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
(( MEM_MIB > 0 )) || MEM_MIB=512
GPUS=${SLURM_GPUS:-0}
if [[ -z ${SLURM_GPUS:-} ]] && command -v nvidia-smi >/dev/null; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
NODE_GRES=""
GRES_LINE=""
if (( GPUS > 0 )); then
  NODE_GRES=" Gres=gpu:$GPUS"
  GRES_LINE="GresTypes=gpu"
  tmp=$(mktemp)
  echo "NodeName=$HOST Name=gpu File=/dev/nvidia[0-$((GPUS - 1))]" >"$tmp"
  install_if_changed "$tmp" "$CONF_DIR/gres.conf" 644 || true
fi

tmp=$(mktemp)
cat >"$tmp" <<EOF
# Written by scripts/slurm-up.sh: a single-node cluster on $HOST (re-run the script to update).
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# no cgroups in containers/CI: track processes by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
# one small node: scheduling passes are cheap, so run them often (requeued jobs start sooner)
SchedulerParameters=sched_interval=5,bf_interval=5
# cores are the consumable; memory is checked against RealMemory but not reserved, so jobs that
# do not ask for memory do not block the whole node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the node definition below wins over what slurmd detects (VMs, laptops, cpusets)
SlurmdParameters=config_overrides
# preempted / timed-out / 'scontrol requeue'd jobs go back to the queue (submitit relies on it)
JobRequeue=1
# a requeued job may start again after cred_expire seconds (default 120); 30 keeps enough
# time for step launches on a loaded machine
AuthInfo=cred_expire=30
ReturnToService=2
# SIGTERM -> SIGKILL grace; submitit ignores SIGTERM and checkpoints on the earlier USR2
KillWait=5
MinJobAge=600
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
$GRES_LINE
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MIB$NODE_GRES State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
restart=0
install_if_changed "$tmp" "$CONF_DIR/slurm.conf" 644 && restart=1

# ---------------------------------------------------------------- munge (must run as user munge)
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge sh -c 'munge -n | unmunge' || fail_with_logs "munged did not start" /var/log/munge/munged.log
fi

# ---------------------------------------------------------------- MariaDB + slurmdbd (accounting)
db_ping() { mariadb-admin ping --silent >/dev/null 2>&1; }
if ! db_ping 2>/dev/null; then
  log "starting MariaDB"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if [[ -x /etc/init.d/mariadb ]]; then
    /etc/init.d/mariadb start >/dev/null
  else
    (mysqld_safe --skip-syslog >/dev/null 2>&1 &)
  fi
  wait_for 60 mariadb db_ping || fail_with_logs "MariaDB did not start" /var/log/mysql/error.log
fi

# the DB password lives only in slurmdbd.conf (mode 600); keep it across re-runs
DB_PASS=$(sed -n 's/^StoragePass=//p' "$CONF_DIR/slurmdbd.conf" 2>/dev/null || true)
[[ -n $DB_PASS ]] || DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
mariadb -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

tmp=$(mktemp)
cat >"$tmp" <<EOF
# Written by scripts/slurm-up.sh: accounting for the single-node cluster '$CLUSTER'.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
EOF
restart_dbd=0
install_if_changed "$tmp" "$CONF_DIR/slurmdbd.conf" 600 && restart_dbd=1
if ((restart_dbd)) || ! alive "$RUN_DIR/slurmdbd.pid"; then
  stop_pidfile "$RUN_DIR/slurmdbd.pid"
  log "starting slurmdbd"
  slurmdbd
fi
wait_for "$TIMEOUT" slurmdbd sacctmgr -n list cluster \
  || fail_with_logs "slurmdbd is not answering sacctmgr" "$LOG_DIR/slurmdbd.log"
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  log "registering cluster '$CLUSTER' with slurmdbd"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if ((restart)) || ! alive "$RUN_DIR/slurmctld.pid" || ! alive "$RUN_DIR/slurmd.pid"; then
  stop_pidfile "$RUN_DIR/slurmd.pid"
  stop_pidfile "$RUN_DIR/slurmctld.pid"
  log "starting slurmctld and slurmd ($CPUS CPUs, ${MEM_MIB} MiB, $GPUS GPUs, partition '$PARTITION')"
  slurmctld -i
  wait_for 30 slurmctld scontrol ping || fail_with_logs "slurmctld did not start" "$LOG_DIR/slurmctld.log"
  slurmd
fi

node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n 1; }
resumed=0
for _ in $(seq $((TIMEOUT * 5))); do
  state=$(node_state)
  case $state in
    idle|mix|alloc|comp) log "node $HOST is $state in partition '$PARTITION' (cluster '$CLUSTER')"; exit 0 ;;
    drain*|drng|down*|inval*|fail*)
      # a node left down/drained by an earlier run comes back once the daemons are healthy
      if ((resumed == 0)); then scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true; resumed=1; fi ;;
  esac
  sleep 0.2
done
fail_with_logs "node $HOST did not become idle within ${TIMEOUT}s (state: '$(node_state)'; $(sinfo -h -R 2>/dev/null))" \
  "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"
