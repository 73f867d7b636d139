#!/usr/bin/env bash
# Bring up (or down) a real one-machine SLURM for the launch tests: slurmctld + slurmd + munge.
#
#   launch/ci_slurm.sh start   # install Debian's slurm if missing (needs root), write slurm.conf, start
#   launch/ci_slurm.sh stop    # stop the daemons by their pid files
#   launch/ci_slurm.sh status  # exit 0 when the partition is up
#
# Used by .ci/run; harmless to run twice. Without root and without a running SLURM it explains why and
# exits 0, so the SLURM tests skip with that reason instead of failing on an unrelated machine.
set -euo pipefail

CONF=/etc/slurm/slurm.conf

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; }

up() { sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  install -d /etc/slurm
  cat >"$CONF" <<EOF
ClusterName=ci
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_min_interval=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  if up; then echo "ci_slurm: SLURM already up"; return 0; fi
  if [ "$(id -u)" != 0 ]; then echo "ci_slurm: not root and no SLURM running; SLURM tests will skip"; return 0; fi
  if ! have_slurm; then
    echo "ci_slurm: installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; }; then
      echo "ci_slurm: apt-get could not install SLURM; SLURM tests will skip"; return 0
    fi
  fi
  [ -f "$CONF" ] || write_conf
  [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  install -d -o munge -g munge -m 755 /run/munge
  install -d /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null || runuser -u munge -- /usr/sbin/munged
  /usr/sbin/slurmctld
  /usr/sbin/slurmd
  for _ in $(seq 1 60); do
    if up; then echo "ci_slurm: SLURM up ($(sinfo -h -o '%P %D %c %t'))"; return 0; fi
    sleep 0.5
  done
  echo "ci_slurm: SLURM did not come up; see /var/log/slurm" >&2
  tail -n 20 /var/log/slurm/*.log >&2 || true
  return 1
}

stop() {
  for pidf in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if [ -f "$pidf" ]; then kill "$(cat "$pidf")" 2>/dev/null || true; fi
  done
  echo "ci_slurm: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) up ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
