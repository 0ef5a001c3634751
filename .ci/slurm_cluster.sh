#!/usr/bin/env bash
# A local SLURM cluster of two emulated nodes (n1, n2) on this one machine, for tests/test_slurm.py.
#
#   bash .ci/slurm_cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (if missing; needs root)
#   bash .ci/slurm_cluster.sh start     # install if missing, then start munged, slurmctld and two slurmd (the default);
#                                       # a cluster this script started that is still up is reused
#   bash .ci/slurm_cluster.sh status    # exit 0 if the cluster this script started is up (prints sinfo)
#   bash .ci/slurm_cluster.sh env       # print `export SLURM_CONF=...` for sbatch/squeue/sinfo against this cluster
#   bash .ci/slurm_cluster.sh logs      # print the daemons' logs (the tail of each)
#   bash .ci/slurm_cluster.sh stop      # cancel its jobs, stop the daemons it started (by their pid files)
#
# Everything lives in $BFPP_SLURM_DIR (default /tmp/lightning-bfpp-slurm): slurm.conf, the munge key and socket, the
# pid files, the logs, the controller's state and the nodes' spool directories. The daemons use their own munge
# socket and ports ($BFPP_SLURM_PORT, default 16817 for slurmctld, +1 and +2 for the two slurmd), so a SLURM or munge
# already installed and running on the machine is left alone. Runs as root (SlurmUser=root): a test cluster only.
#
# Facts this relies on (Debian 12, SLURM 22.05): one slurmd per emulated node, started as `slurmd -N <node>`, each node
# declared with NodeHostname=<this host> and its own Port, `%n` in the slurmd pid/spool/log paths; the node names
# resolve to 127.0.0.1 (added to /etc/hosts when they do not resolve); proctrack/linuxproc and task/none (no cgroups);
# SlurmdParameters=config_overrides (the declared CPUs count, whatever the machine has); munged runs as user munge.
set -euo pipefail

STATE="${BFPP_SLURM_DIR:-/tmp/lightning-bfpp-slurm}"
PORT="${BFPP_SLURM_PORT:-16817}"
NODES=(n1 n2)
CPUS_PER_NODE="${BFPP_SLURM_CPUS:-2}"
CONF="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
SOCKET="$MUNGE_DIR/munge.socket"
RUN="$STATE/run"
LOG="$STATE/log"
HOST="$(uname -n)"
HOST="${HOST%%.*}"
export SLURM_CONF="$CONF"

say() { echo "[slurm_cluster] $*"; }
die() { echo "[slurm_cluster] ERROR: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------------- install
have_tools() {
  local tool
  for tool in slurmctld slurmd sbatch srun squeue sinfo scontrol scancel munged mungekey munge unmunge; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || return 1
  done
}

install_packages() {
  export PATH="$PATH:/usr/sbin:/sbin"
  if have_tools; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "slurmctld, slurmd, slurm-client and munge are not installed and this is not root: install them (apt-get install slurmctld slurmd slurm-client munge)."
  command -v apt-get >/dev/null 2>&1 || die "slurmctld, slurmd, slurm-client and munge are not installed and there is no apt-get: install them by hand."
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  # Keep the packages' own services from starting (they would use the system's paths and ports): a policy-rc.d that
  # denies every start, removed afterwards unless one was there before.
  local policy=/usr/sbin/policy-rc.d added=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added=1
  fi
  local rc=0
  {
    timeout 300 apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge
  } >"/tmp/lightning-bfpp-slurm-apt.log" 2>&1 || rc=$?
  if [ "$added" = 1 ]; then rm -f "$policy"; fi
  if [ "$rc" != 0 ]; then
    tail -n 30 /tmp/lightning-bfpp-slurm-apt.log >&2
    die "apt-get install slurmctld slurmd slurm-client munge failed (exit $rc, log: /tmp/lightning-bfpp-slurm-apt.log)."
  fi
  have_tools || die "the packages were installed but some tools are still missing."
}

# ------------------------------------------------------------------------------------------------ pid files
# pid file -> the daemon's executable name (the process in the pid file must be that daemon, else it is not ours)
daemon_pidfiles() {
  local node
  for node in "${NODES[@]}"; do echo "$RUN/slurmd-$node.pid slurmd"; done
  echo "$RUN/slurmctld.pid slurmctld"
  echo "$MUNGE_DIR/munged.pid munged"
}

# the pid in $1 if that process is alive, is named $2 and was started with this cluster's files on its command line
# (slurm.conf, or munged's socket): a pid reused by another process, or another SLURM's daemon, is never ours
live_pid() {
  local file="$1" name="$2" pid comm
  [ -s "$file" ] || return 1
  pid="$(tr -dc 0-9 <"$file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  case "$comm" in "$name" | "${name}-wlm") ;; *) return 1 ;; esac
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -e "$CONF" -e "--socket=$SOCKET" || return 1
  echo "$pid"
}

all_up() {
  local file name
  while read -r file name; do
    live_pid "$file" "$name" >/dev/null || return 1
  done < <(daemon_pidfiles)
  timeout 10 scontrol ping 2>/dev/null | grep -q "UP"
}

any_up() {
  local file name
  while read -r file name; do
    if live_pid "$file" "$name" >/dev/null; then return 0; fi
  done < <(daemon_pidfiles)
  return 1
}

wait_for() {  # wait_for <seconds> <description> <command...>: polls every 0.5 s
  local limit="$1" what="$2" start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - start >= limit)); then
      show_logs >&2
      die "timed out after ${limit} s waiting for $what"
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------------- config
write_config() {
  local node i=0
  {
    cat <<EOF
# Written by .ci/slurm_cluster.sh: a test cluster of emulated nodes on $HOST.
ClusterName=bfppci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MessageTimeout=20
MailProg=/bin/true
EOF
    for node in "${NODES[@]}"; do
      i=$((i + 1))
      echo "NodeName=$node NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS_PER_NODE State=UNKNOWN"
    done
    local IFS=,
    echo "PartitionName=ci Nodes=${NODES[*]} Default=YES MaxTime=60 State=UP"
  } >"$CONF.new"
  mv "$CONF.new" "$CONF"
}

resolve_nodes() {
  local node addr
  for node in "${NODES[@]}"; do
    addr="$(getent hosts "$node" | awk '{print $1; exit}' || true)"
    if [ -z "$addr" ]; then
      [ -w /etc/hosts ] || die "node name $node does not resolve and /etc/hosts is not writable: add '127.0.0.1 ${NODES[*]}' to it."
      say "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
      echo "127.0.0.1 ${NODES[*]}  # lightning-bfpp: .ci/slurm_cluster.sh" >>/etc/hosts
      return
    fi
    case "$addr" in
      127.*) ;;
      *) die "node name $node resolves to $addr, not to this machine (127.0.0.1): the emulated nodes need it." ;;
    esac
  done
}

# ----------------------------------------------------------------------------------------------- start / stop
start() {
  install_packages
  export PATH="$PATH:/usr/sbin:/sbin"
  [ "$(id -u)" = 0 ] || die "the test cluster runs its daemons as root (slurmd needs it): run as root."
  if all_up && nodes_ready; then
    say "reusing the running cluster ($CONF)"
    return 0
  fi
  if any_up; then
    say "a part of an earlier cluster is running: stopping it first"
    stop
  fi
  resolve_nodes
  # a fresh cluster: no jobs left over from an earlier one (they would be started again). Only a directory this
  # script made (it holds the marker) or an empty/new one is used, since its subdirectories are removed.
  if [ -d "$STATE" ] && [ ! -e "$STATE/.lightning-bfpp-slurm" ] && [ -n "$(ls -A "$STATE")" ]; then
    die "$STATE exists and was not made by this script: set BFPP_SLURM_DIR to a new directory."
  fi
  mkdir -p "$STATE"
  touch "$STATE/.lightning-bfpp-slurm"
  rm -rf "$STATE/ctld" "$STATE/spool" "$RUN" "$LOG"
  mkdir -p "$STATE/ctld" "$STATE/spool" "$RUN" "$LOG"
  chmod 755 "$STATE"
  write_config

  # munge: its own key, socket, pid and log, as user munge
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
  chown -R munge:munge "$MUNGE_DIR"  # the munge user may have been made anew since (uid changed)
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    mungekey -c -k "$MUNGE_DIR/munge.key"
  fi
  chown munge:munge "$MUNGE_DIR/munge.key"
  chmod 0600 "$MUNGE_DIR/munge.key"
  rm -f "$SOCKET" "$SOCKET.lock"
  runuser -u munge -- munged --socket="$SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
    </dev/null >>"$LOG/start.log" 2>&1 || { show_logs >&2; die "munged did not start"; }
  wait_for 20 "munged" bash -c "munge -n -S '$SOCKET' | unmunge -S '$SOCKET'"

  slurmctld -f "$CONF" </dev/null >>"$LOG/start.log" 2>&1 || { show_logs >&2; die "slurmctld did not start"; }
  wait_for 60 "slurmctld to answer" bash -c "timeout 10 scontrol ping | grep -q UP"
  local node
  for node in "${NODES[@]}"; do
    slurmd -N "$node" -f "$CONF" </dev/null >>"$LOG/start.log" 2>&1 || { show_logs >&2; die "slurmd -N $node did not start"; }
  done
  wait_for 90 "nodes ${NODES[*]} to be idle" nodes_ready_or_resume
  say "cluster up: $(sinfo -h -o '%P %D nodes %T %N' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

nodes_ready() {
  local states
  states="$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
  [ "$(echo "$states" | grep -cE ' (idle|mixed|allocated|completing)$')" = "${#NODES[@]}" ]
}

nodes_ready_or_resume() {
  nodes_ready && return 0
  # a node that registered as down/drained (e.g. after an unclean stop) is put back into service
  if timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | grep -qE ' (down|drained|draining)'; then
    local IFS=,
    timeout 10 scontrol update NodeName="${NODES[*]}" State=RESUME >/dev/null 2>&1 || true
  fi
  return 1
}

stop() {
  export PATH="$PATH:/usr/sbin:/sbin"
  local file name pid stopped=()
  # cancel this cluster's jobs first, so that no job step (slurmstepd and its tasks) outlives the daemons
  if live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null && [ -s "$CONF" ]; then
    timeout 10 scancel --partition=ci >/dev/null 2>&1 || true
    local start=$SECONDS
    while ((SECONDS - start < 20)) && [ -n "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]; do sleep 0.5; done
  fi
  while read -r file name; do
    if pid="$(live_pid "$file" "$name")"; then
      kill -TERM "$pid" 2>/dev/null || true
      stopped+=("$pid:$name:$file")
    fi
  done < <(daemon_pidfiles)
  local entry start
  for entry in "${stopped[@]}"; do
    pid="${entry%%:*}"
    start=$SECONDS
    while kill -0 "$pid" 2>/dev/null && ((SECONDS - start < 15)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped ${entry#*:}"
  done
  if [ "${#stopped[@]}" = 0 ]; then say "nothing of ours was running"; fi
  rm -f "$RUN"/*.pid "$MUNGE_DIR/munged.pid" 2>/dev/null || true
}

show_logs() {
  local f
  for f in "$LOG"/slurmctld.log "$LOG"/slurmd-*.log "$MUNGE_DIR/munged.log" "$LOG/start.log"; do
    [ -f "$f" ] || continue
    echo "===== $f (last 60 lines)"
    tail -n 60 "$f"
  done
}

case "${1:-start}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status)
    export PATH="$PATH:/usr/sbin:/sbin"
    if all_up; then sinfo; else say "not running"; exit 1; fi
    ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  logs) show_logs ;;
  *) die "usage: $0 [install|start|stop|status|env|logs]" ;;
esac
