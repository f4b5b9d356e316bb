#!/usr/bin/env bash
# Stop the cluster started by slurm/start-cluster.sh, strictly by PID file (never by process
# name: other SLURMs or databases on the machine are not ours).
#   bash slurm/stop-cluster.sh           cancel all jobs, stop slurmd x2, slurmctld, slurmdbd, mariadbd, munged
#   bash slurm/stop-cluster.sh --purge   ... and delete the state (job state, DB, logs, key, configs)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB=${SLURMLAB:-$(dirname "$HERE")/.slurm-lab}
export SLURM_CONF=$LAB/etc/slurm.conf
PURGE=0; [[ ${1:-} == --purge ]] && PURGE=1

alive() {  # alive PIDFILE EXE-SUBSTRING
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}
stop_pidfile() {  # stop_pidfile NAME PIDFILE EXE-SUBSTRING
  local name=$1 pf=$2 exe=$3 pid i
  if ! alive "$pf" "$exe"; then echo "[stop-cluster] $name not running"; rm -f "$pf"; return 0; fi
  pid=$(<"$pf")
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do  # up to 20 s
    [[ -e /proc/$pid ]] || break
    sleep 0.2
  done
  if [[ -e /proc/$pid ]]; then
    echo "[stop-cluster] $name (pid $pid) ignored SIGTERM, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null; sleep 0.5
  fi
  echo "[stop-cluster] stopped $name (pid $pid)"
  rm -f "$pf"
}

# 1. cancel every job of this private cluster and wait for them to leave the queue
if alive "$LAB/run/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    echo "[stop-cluster] cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for ((i = 0; i < 150; i++)); do
      [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
fi

# 2. daemons, reverse start order (one slurmd per node, PID files named after the node)
for pf in "$LAB"/run/slurmd-*.pid; do
  [[ -e $pf ]] || continue
  name=$(basename "$pf" .pid)
  alive "$pf" slurmd && left=$(scontrol listpids 2>/dev/null | awk 'NR > 1 {print $1}' | tr '\n' ' ')
  [[ -n ${left:-} && -n ${left// /} ]] && echo "[stop-cluster] WARNING: job processes still alive: $left"
  stop_pidfile "$name" "$pf" slurmd
done
stop_pidfile slurmctld "$LAB/run/slurmctld.pid" slurmctld
stop_pidfile slurmdbd  "$LAB/run/slurmdbd.pid"  slurmdbd
stop_pidfile mariadbd  "$LAB/run/mysqld.pid"    mariadbd
stop_pidfile munged    "$LAB/run/munged.pid"    munged

if (( PURGE )); then
  rm -rf "$LAB"/{state,log,run,mysql,munge,fakedev,etc,env.sh}
  echo "[stop-cluster] purged state under $LAB"
fi
