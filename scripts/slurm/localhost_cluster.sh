#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost (Debian 12 packages: Slurm 22.05 + munge, slurmdbd + MariaDB for
# sacct), for CI and for trying the SLURM recipes on one machine. Root, no systemd, every address 127.0.0.1.
#   scripts/slurm/localhost_cluster.sh up     # install missing packages, start daemons, wait for an idle node
#   scripts/slurm/localhost_cluster.sh down   # cancel jobs, stop the daemons this script started (by saved PID)
#   scripts/slurm/localhost_cluster.sh status
# Env: SLURM_CI_DIR (state/logs, default /tmp/alignkit-slurm); SLURM_CI_CPUS (CPUs advertised, default 8, more
#      than the real ones so a sweep and 2-task jobs run side by side); SLURM_CI_ACCOUNTING (1: slurmdbd + MariaDB,
#      needed by submitit to see jobs that die without a result; 0: none). Partition: debug.
# Why accounting: without sacct a cancelled/killed submitit job stays UNKNOWN forever and a sweep hangs.
# Why cred_expire=10 / sched_interval=2: a requeued job otherwise waits ~120-160 s before it runs again.
set -euo pipefail
# A failure under set -e would otherwise exit silently: say which command failed and where.
trap 'rc=$?; echo "localhost_cluster: failed (exit $rc) at line $LINENO: $BASH_COMMAND; logs in $D/log" >&2' ERR
D=${SLURM_CI_DIR:-/tmp/alignkit-slurm}
ACCT=${SLURM_CI_ACCOUNTING:-1}
CPUS=${SLURM_CI_CPUS:-8}

alive() {
  [ -s "$D/pids" ] || return 1
  while read -r n p; do [ "$(ps -o comm= -p "$p" 2>/dev/null)" = "$n" ] || return 1; done < "$D/pids"
}

install_packages() {
  local pkgs="munge slurmctld slurmd slurm-client" missing
  [ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "localhost_cluster: installing $missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
}

start() { local n=$1; shift; "$@" > "$D/log/$n.out" 2>&1 & echo "$n $!" >> "$D/pids"; }
waitfor() {
  for _ in $(seq 1 240); do eval "$2" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "localhost_cluster: $1 not up after 60 s; logs in $D/log" >&2
  tail -n 20 "$D"/log/* >&2 || true
  exit 1
}

down() {
  [ -s "$D/pids" ] || { echo "localhost_cluster: nothing to stop"; return 0; }
  if scontrol ping 2>/dev/null | grep -q UP; then
    squeue -h -o %A | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 1 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  # only the PIDs we started, and only while they still run the program we started (PIDs get reused)
  # A daemon that already died (an interrupted run, a kill -9) is simply not listed. `if`, not `[ ] && echo`:
  # the loop's status is its last command's, and a failed test there made this assignment fail under set -e.
  local pids
  pids=$(while read -r n p; do if [ "$(ps -o comm= -p "$p" 2>/dev/null)" = "$n" ]; then echo "$p"; fi; done < "$D/pids")
  # shellcheck disable=SC2086
  if [ -n "$pids" ]; then kill $pids 2>/dev/null || true; fi
  for _ in $(seq 1 60); do
    local up=""; for p in $pids; do kill -0 "$p" 2>/dev/null && up=1; done
    [ -z "$up" ] && break; sleep 0.25
  done
  for p in $pids; do if kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi; done
  rm -f "$D/pids"
  echo "localhost_cluster: stopped"
}

up() {
  if alive && scontrol ping 2>/dev/null | grep -q UP; then echo "localhost_cluster: already up"; return 0; fi
  [ -f "$D/pids" ] && down
  [ "$(id -u)" = 0 ] || { echo "localhost_cluster: must run as root (daemons, /etc/slurm)" >&2; exit 1; }
  install_packages
  rm -rf "$D"; mkdir -p "$D"/{state,spool,log}; : > "$D/pids"

  local hw mem acct
  hw=$(slurmd -C | head -n1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  acct="AccountingStorageType=accounting_storage/none"
  [ "$ACCT" = 1 ] && acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1'
  mkdir -p /etc/slurm
  cat > /etc/slurm/slurm.conf <<EOC
ClusterName=alignkit
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
KillWait=5
JobRequeue=1
JobAcctGatherType=jobacct_gather/linux
$acct
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$((mem * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOC

  # munge (Slurm 22.05 has no auth/slurm)
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
  waitfor munged "munge -n | unmunge"

  if [ "$ACCT" = 1 ]; then  # fresh accounting DB each start: job ids restart at 1
    install -d -o mysql -g mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    start mariadbd /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1
    waitfor mariadbd "mariadb-admin ping"
    mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    cat > /etc/slurm/slurmdbd.conf <<EOC
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
EOC
    chmod 600 /etc/slurm/slurmdbd.conf
    start slurmdbd slurmdbd -D
    waitfor slurmdbd "sacctmgr -n list cluster"
  fi

  start slurmctld slurmctld -D
  waitfor slurmctld "scontrol ping | grep -q UP"
  start slurmd slurmd -D -N localhost
  waitfor "node idle" "sinfo -h -n localhost -o %t | grep -qx idle"
  echo "localhost_cluster: up ($(sinfo -h -o '%P %D %c cpus %m MB %t'))"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if alive && scontrol ping 2>/dev/null | grep -q UP; then sinfo; else echo "down"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
