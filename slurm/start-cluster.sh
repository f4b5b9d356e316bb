#!/usr/bin/env bash
# Start bonnerlab's one-machine SLURM cluster on localhost, as root, without systemd or cgroups:
#   munged -> mariadbd + slurmdbd (real sacct) -> slurmctld -> one slurmd per node.
# Idempotent: a daemon whose PID file points at a live process is left alone, and configs are
# re-rendered (slurmctld then reconfigures). Everything lives under $SLURMLAB (default
# <repo>/.slurm-lab). Adapted from ../shared/reference/slurm-local (see its README for the why).
#
#   bash slurm/start-cluster.sh          # installs missing Debian packages, then starts
#   source .slurm-lab/env.sh             # clients (sbatch, squeue, submitit) need SLURM_CONF
#   bash slurm/stop-cluster.sh [--purge]
#
# Knobs (environment):
#   SLURMLAB=DIR                 state root (default: <repo>/.slurm-lab)
#   SLURMLAB_ACCOUNTING=dbd|none dbd: MariaDB + slurmdbd, real sacct (default); none: squeue shim
#   SLURMLAB_CPUS=N              CPUs per node (default 8: overcommits small machines on purpose,
#                                so 1-CPU jobs run side by side)
#   SLURMLAB_MEM_MB=N            RealMemory per node (default: MemTotal - 1 GiB)
#   SLURMLAB_GPUS=N              fake GPUs on the gpu node (default 2)
#   SLURMLAB_MAX_ARRAY=N         MaxArraySize (default 1001)
#   SLURMLAB_DEF_MEM_PER_CPU=MB  memory of a job that asks for none, per CPU (default RealMemory / CPUs)
#   SLURMLAB_INSTALL=1|0         apt-get install missing packages (default 1)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB=${SLURMLAB:-$(dirname "$HERE")/.slurm-lab}
ACCT=${SLURMLAB_ACCOUNTING:-dbd}
HOST=$(hostname -s)
NPROC=$(nproc)
CPUS=${SLURMLAB_CPUS:-8}
MEM=${SLURMLAB_MEM_MB:-$(( $(awk '/^MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))}
NGPU=${SLURMLAB_GPUS:-2}
MAX_ARRAY=${SLURMLAB_MAX_ARRAY:-1001}
# memory a job gets per CPU when it asks for none (MB): 8 such 1-CPU jobs fit a node
DEF_MEM_PER_CPU=${SLURMLAB_DEF_MEM_PER_CPU:-$(( MEM / CPUS ))}
CTLD_PORT=${SLURMLAB_CTLD_PORT:-6817}
SLURMD_PORT=${SLURMLAB_SLURMD_PORT:-6818}
SLURMD_PORT_GPU=${SLURMLAB_SLURMD_PORT_GPU:-6828}
DBD_PORT=${SLURMLAB_DBD_PORT:-6819}
MYSQL_PORT=${SLURMLAB_MYSQL_PORT:-3307}
# Node names: the gpu node takes the machine's own name so it resolves; the cpu node's name does
# not, and bonnerlab.cluster.submit falls back to its NodeAddr for the DDP rendezvous address.
CPU_NODE=${SLURMLAB_CPU_NODE:-$HOST-cpu}
GPU_NODE=${SLURMLAB_GPU_NODE:-$HOST}
NODES=("$CPU_NODE" "$GPU_NODE")
export SLURM_CONF=$LAB/etc/slurm.conf
T0=$(date +%s%N)

log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start-cluster %3d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() { echo "start-cluster: ERROR: $*" >&2; exit 1; }

# alive PIDFILE EXE-SUBSTRING: is the PID in PIDFILE a live process running EXE-SUBSTRING?
# (PID files can outlive their process; a recycled PID must not count as our daemon.)
alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || die "timed out after ${t}s waiting for $what (logs: $LAB/log)"
    sleep 0.2
  done
}

[[ $(id -u) == 0 ]] || die "must run as root (slurmd and munged need it); use '--cluster local' instead"

# ---------------------------------------------------------------- packages
need_pkgs=()
command -v slurmctld >/dev/null || need_pkgs+=(slurmctld)
command -v slurmd >/dev/null || need_pkgs+=(slurmd)
command -v sbatch >/dev/null || need_pkgs+=(slurm-client)
command -v munged >/dev/null || need_pkgs+=(munge)
if [[ $ACCT == dbd ]]; then
  command -v slurmdbd >/dev/null || need_pkgs+=(slurmdbd)
  command -v mariadbd >/dev/null || need_pkgs+=(mariadb-server)
fi
if (( ${#need_pkgs[@]} )); then
  [[ ${SLURMLAB_INSTALL:-1} == 1 ]] || die "missing packages: ${need_pkgs[*]}"
  command -v apt-get >/dev/null || die "missing packages ${need_pkgs[*]} and no apt-get to install them"
  log "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# ---------------------------------------------------------------- dirs + configs
mkdir -p "$LAB"/{etc,run,log,state/ctld,munge,fakedev}
chmod 700 "$LAB/munge"

if [[ $ACCT == dbd ]]; then
  ACCOUNTING="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# munge socket for the slurmdbd connection (AuthInfo socket= is not used for it)
AccountingStoragePass=$LAB/run/munge.socket.2
AccountingStorageTRES=gres/gpu"
elif [[ $ACCT == none ]]; then
  ACCOUNTING="AccountingStorageType=accounting_storage/none"
else
  die "SLURMLAB_ACCOUNTING must be dbd or none"
fi
SLURMD_PARAMS=""
# more CPUs than the machine has: slurmd must trust slurm.conf instead of its own count
(( CPUS > NPROC )) && SLURMD_PARAMS="SlurmdParameters=config_overrides"
GPU_GRES=""
(( NGPU > 0 )) && GPU_GRES="Gres=gpu:$NGPU"

render() {  # render TEMPLATE OUT: replace @VARS@, write atomically
  local tmp; tmp=$(mktemp "$2.XXXX")
  awk -v acct="$ACCOUNTING" -v sp="$SLURMD_PARAMS" '
    $0 == "@ACCOUNTING@" { print acct; next }
    $0 == "@SLURMD_PARAMS@" { if (sp != "") print sp; next }
    { print }' "$1" |
  sed -e "s#@LAB@#$LAB#g" -e "s#@HOST@#$HOST#g" -e "s#@CPUS@#$CPUS#g" -e "s#@MEM@#$MEM#g" \
      -e "s#@MAXGPU@#$((NGPU - 1))#g" -e "s#@GPU_GRES@#$GPU_GRES#g" -e "s#@MAX_ARRAY@#$MAX_ARRAY#g" \
      -e "s#@CPU_NODE@#$CPU_NODE#g" -e "s#@GPU_NODE@#$GPU_NODE#g" \
      -e "s#@CTLD_PORT@#$CTLD_PORT#g" -e "s#@SLURMD_PORT@#$SLURMD_PORT#g" \
      -e "s#@SLURMD_PORT_GPU@#$SLURMD_PORT_GPU#g" -e "s#@DBD_PORT@#$DBD_PORT#g" \
      -e "s#@MYSQL_PORT@#$MYSQL_PORT#g" -e "s#@DEF_MEM_PER_CPU@#$DEF_MEM_PER_CPU#g" >"$tmp"
  mv "$tmp" "$2"
}
render "$HERE/templates/slurm.conf.in" "$LAB/etc/slurm.conf"
if (( NGPU > 0 )); then
  render "$HERE/templates/gres.conf.in" "$LAB/etc/gres.conf"
  for ((i = 0; i < NGPU; i++)); do  # without a real device file the node drains
    [[ -c $LAB/fakedev/nvidia$i ]] || { rm -f "$LAB/fakedev/nvidia$i"; mknod "$LAB/fakedev/nvidia$i" c 195 "$i"; }
  done
else
  sed -i '/^GresTypes=/d' "$LAB/etc/slurm.conf"
  rm -f "$LAB/etc/gres.conf"
fi
if [[ $ACCT == dbd ]]; then
  render "$HERE/templates/slurmdbd.conf.in" "$LAB/etc/slurmdbd.conf"
  chmod 600 "$LAB/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable conf
fi
{
  echo "export SLURM_CONF=$SLURM_CONF"
  # no slurmdbd: put the squeue-based sacct stand-in first on PATH (submitit polls sacct)
  [[ $ACCT == none ]] && echo "export PATH=$HERE/templates/shim:\$PATH"
} >"$LAB/env.sh"
log "configs rendered (nodes=${NODES[*]} cpus=$CPUS mem=${MEM}M gpus=$NGPU accounting=$ACCT)"

# ---------------------------------------------------------------- munge
MSOCK=$LAB/run/munge.socket.2
if ! alive "$LAB/run/munged.pid" munged; then
  [[ -s $LAB/munge/munge.key ]] || mungekey -c -k "$LAB/munge/munge.key"
  chmod 600 "$LAB/munge/munge.key"
  rm -f "$MSOCK" "$MSOCK.lock"
  munged --key-file="$LAB/munge/munge.key" --socket="$MSOCK" --pid-file="$LAB/run/munged.pid" \
         --log-file="$LAB/log/munged.log" --seed-file="$LAB/munge/munged.seed" --num-threads=4
fi
wait_for 20 munged bash -c "munge -S '$MSOCK' -n | unmunge -S '$MSOCK'"
log "munged up (pid $(<"$LAB/run/munged.pid"))"

# ---------------------------------------------------------------- mariadb + slurmdbd
if [[ $ACCT == dbd ]]; then
  MYSOCK=$LAB/run/mysqld.sock
  if ! alive "$LAB/run/mysqld.pid" mariadbd; then
    if [[ ! -d $LAB/mysql/data/mysql ]]; then
      mkdir -p "$LAB/mysql"
      mariadb-install-db --user=root --datadir="$LAB/mysql/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$LAB/log/mysql-install.log" 2>&1 || die "mariadb-install-db failed, see $LAB/log/mysql-install.log"
    fi
    setsid nohup mariadbd --no-defaults --user=root --datadir="$LAB/mysql/data" --socket="$MYSOCK" \
      --pid-file="$LAB/run/mysqld.pid" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
      --log-error="$LAB/log/mysqld.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      --skip-log-bin </dev/null >/dev/null 2>&1 &
  fi
  wait_for 60 mariadbd mariadb-admin --socket="$MYSOCK" -uroot ping
  mariadb --socket="$MYSOCK" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  log "mariadbd up (pid $(<"$LAB/run/mysqld.pid"))"
  if ! alive "$LAB/run/slurmdbd.pid" slurmdbd; then
    slurmdbd   # reads slurmdbd.conf from the folder of $SLURM_CONF
  fi
  wait_for 60 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  log "slurmdbd up (pid $(<"$LAB/run/slurmdbd.pid"))"
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if ! alive "$LAB/run/slurmctld.pid" slurmctld; then
  slurmctld -f "$SLURM_CONF"
else
  scontrol reconfigure || true
fi
wait_for 60 slurmctld bash -c "scontrol ping | grep -q 'is UP'"
log "slurmctld up (pid $(<"$LAB/run/slurmctld.pid"))"

for node in "${NODES[@]}"; do
  mkdir -p "$LAB/state/d-$node"
  alive "$LAB/run/slurmd-$node.pid" slurmd || slurmd -f "$SLURM_CONF" -N "$node"
done
node_ready() {  # node_ready NAME: idle/mixed/allocated; resume a node that came up drained
  local st; st=$(sinfo -h -n "$1" -o %T | head -1)
  case $st in
    idle|mixed|allocated|completing) return 0 ;;
    *drain*|*down*|*inval*) scontrol update nodename="$1" state=resume >/dev/null 2>&1 || true; return 1 ;;
    *) return 1 ;;
  esac
}
for node in "${NODES[@]}"; do
  wait_for 60 "node $node to become idle" node_ready "$node"
  log "slurmd $node up (pid $(<"$LAB/run/slurmd-$node.pid")), $(sinfo -h -n "$node" -o %T | head -1)"
done
log "cluster ready: source $LAB/env.sh   (or export SLURM_CONF=$SLURM_CONF)"
