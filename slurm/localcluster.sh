#!/usr/bin/env bash
# A real single-node SLURM cluster for tests and CI (Debian's slurm-wlm + munge, run as root,
# no systemd, no cgroups). Partitions: `batch` (default) and `gpu` (fake GPUs: char devices).
#
#   slurm/localcluster.sh start    install if missing, fresh state, start munged/slurmctld/slurmd, health
#   slurm/localcluster.sh stop     scancel every job, stop the daemons, kill leftover job processes
#   slurm/localcluster.sh status   daemons and node state (exit 1 when down)
#   slurm/localcluster.sh health   one tiny job per partition (exit 1 when one fails)
#   slurm/localcluster.sh env      print `export SLURM_CONF=...` for this cluster
#
# Settings (environment): CELLMAP_SLURM_ROOT (state dir, default /tmp/cellmap-slurm; wiped at
# start), CELLMAP_SLURM_PORT (slurmctld port, default 6817; slurmd uses PORT+1),
# CELLMAP_SLURM_CPUS / _MEM_MB / _GPUS (advertised node size; nothing is enforced).
set -euo pipefail

ROOT="${CELLMAP_SLURM_ROOT:-/tmp/cellmap-slurm}"
PORT="${CELLMAP_SLURM_PORT:-6817}"
CPUS="${CELLMAP_SLURM_CPUS:-16}"
MEM_MB="${CELLMAP_SLURM_MEM_MB:-128000}"
GPUS="${CELLMAP_SLURM_GPUS:-2}"
NODE="cellmapnode"
CONF="$ROOT/etc/slurm.conf"
MUNGE_SOCK="$ROOT/munge/run/munge.socket"
export SLURM_CONF="$CONF"

log() { echo "localcluster: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  log "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  local gpu_files=""
  mkdir -p "$ROOT"/{etc,state,spool,log,run,dev} "$ROOT/munge/run" "$ROOT/munge/lib"
  chmod 0755 "$ROOT" "$ROOT/etc" "$ROOT/run" "$ROOT/log" "$ROOT/munge" "$ROOT/munge/run"
  chmod 0700 "$ROOT/munge/lib"
  if [ "$GPUS" -gt 0 ]; then
    local i
    for ((i = 0; i < GPUS; i++)); do
      # gres.conf needs character devices; 1:3 is /dev/null
      mknod -m 666 "$ROOT/dev/fakegpu$i" c 1 3
    done
    gpu_files="$ROOT/dev/fakegpu[0-$((GPUS - 1))]"
  fi
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmctldDebug=info
SlurmdDebug=info
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
SlurmdParameters=config_overrides
EOF
  if [ "$GPUS" -gt 0 ]; then
    cat >>"$CONF" <<EOF
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
EOF
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s\n' "$NODE" "$gpu_files" >"$ROOT/etc/gres.conf"
  else
    echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN" >>"$CONF"
  fi
  cat >>"$CONF" <<EOF
PartitionName=batch Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit="$1" what="$2" t=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    sleep 0.2
    t=$((t + 1))
    if [ "$t" -ge $((limit * 5)) ]; then
      log "timed out waiting for $what (logs: $ROOT/log)"
      return 1
    fi
  done
}

node_idle() { sinfo -h -n "$NODE" -o %t | grep -qE '^(idle|mix|alloc)'; }

no_live_jobs() { [ -z "$(squeue -h -t running,completing -o %A)" ]; }

running() { [ -f "$ROOT/run/slurmctld.pid" ] && kill -0 "$(cat "$ROOT/run/slurmctld.pid")" 2>/dev/null; }

cmd_start() {
  install_packages
  if running; then
    log "already running under $ROOT"
    return 0
  fi
  [ "${#MUNGE_SOCK}" -lt 100 ] || { log "munge socket path too long: $MUNGE_SOCK"; exit 2; }
  cmd_stop_daemons quiet
  rm -rf "$ROOT"
  write_config
  mungekey -c -k "$ROOT/munge/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
  chmod 0600 "$ROOT/munge/munge.key"
  munged -S "$MUNGE_SOCK" --key-file="$ROOT/munge/munge.key" --pid-file="$ROOT/munge/run/munged.pid" \
    --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/lib/munged.seed" --force
  slurmctld -f "$CONF"
  wait_for 30 "slurmctld" scontrol ping
  slurmd -f "$CONF" -N "$NODE"
  wait_for 30 "node $NODE idle" node_idle
  cmd_health
  log "up: export SLURM_CONF=$CONF"
}

kill_pidfile() {  # kill_pidfile FILE: SIGTERM, wait up to 10 s, then SIGKILL
  local f="$1" pid t
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  kill "$pid" 2>/dev/null || return 0
  for ((t = 0; t < 50; t++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

leftover_pids() {  # job processes of this cluster: their environment holds our SLURM_CONF
  local p
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = "$$" ] && continue
    if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
      case "$(cat "$p/comm" 2>/dev/null)" in
        slurmstepd | slurm_script | sleep | bash | python* | apptainer | sh) echo "${p#/proc/}" ;;
      esac
    fi
  done
}

cmd_stop_daemons() {
  kill_pidfile "$ROOT/run/slurmd.pid"
  kill_pidfile "$ROOT/run/slurmctld.pid"
  kill_pidfile "$ROOT/munge/run/munged.pid"
  local pids
  pids="$(leftover_pids | grep -vx "$$" || true)"
  if [ -n "$pids" ]; then
    [ "${1:-}" = quiet ] || log "killing leftover job processes: $(echo "$pids" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one PID per word
    kill -9 $pids 2>/dev/null || true
  fi
}

cmd_stop() {
  if running; then
    local ids
    ids="$(squeue -h -o %A 2>/dev/null | sort -u || true)"
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086 # one job id per word
      scancel $ids 2>/dev/null || true
      wait_for 15 "jobs to end" no_live_jobs || true
    fi
  fi
  cmd_stop_daemons
  log "stopped ($ROOT kept for its logs)"
}

cmd_status() {
  if ! running || ! scontrol ping >/dev/null 2>&1; then
    echo "down ($ROOT)"
    return 1
  fi
  echo "up ($CONF)"
  sinfo -o '%P %a %D %t %G'
  squeue -o '%i %P %j %T %r'
}

health_job() {  # health_job PARTITION [SBATCH ARGS...]
  local part="$1" id state t
  shift
  id="$(sbatch --parsable -p "$part" -t 1 -o /dev/null "$@" --wrap 'true')"
  id="${id%%;*}"
  for ((t = 0; t < 150; t++)); do
    state="$(scontrol show job -o "$id" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
    case "$state" in
      COMPLETED) return 0 ;;
      FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL)
        log "health job $id on $part: $state"
        return 1
        ;;
    esac
    sleep 0.2
  done
  log "health job $id on $part did not finish in 30 s"
  return 1
}

cmd_health() {
  health_job batch
  if [ "$GPUS" -gt 0 ]; then
    health_job gpu --gres=gpu:1
  else
    health_job gpu
  fi
  log "healthy: batch and gpu partitions ran a job"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  health) cmd_health ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 start|stop|status|health|env" >&2
    exit 2
    ;;
esac
