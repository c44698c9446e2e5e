#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by scripts/slurm-up.sh: cancel its jobs, then stop
# slurmd, slurmctld, slurmdbd, MariaDB and munged (each by the pid its pid file names).
# Configs, the accounting DB and job state stay on disk, so slurm-up.sh brings it back as it was.
#
#   sudo bash scripts/slurm-down.sh
set -euo pipefail

RUN_DIR=/run/slurm

die() { echo "slurm-down: error: $*" >&2; exit 1; }
log() { echo "slurm-down: $*"; }

[[ $EUID -eq 0 ]] || die "run as root, e.g. sudo bash $0"

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, then KILL after 10 s
  local pid
  [[ -s $2 ]] || return 0
  pid=$(cat "$2")
  kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }
  log "stopping $1 (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$2"
}

# jobs first, while slurmctld and slurmd can still end their processes
if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    log "cancelling jobs: $jobs"
    scancel --full $jobs 2>/dev/null || true
    for _ in $(seq 75); do [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break; sleep 0.2; done
  fi
fi

stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid"

if command -v mariadb-admin >/dev/null && mariadb-admin ping --silent >/dev/null 2>&1; then
  log "stopping MariaDB"
  if [[ -x /etc/init.d/mariadb ]]; then /etc/init.d/mariadb stop >/dev/null; else mariadb-admin shutdown; fi
fi

stop_pidfile munged /run/munge/munged.pid
log "done"
