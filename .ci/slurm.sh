#!/usr/bin/env bash
# A single-node Slurm for the cluster tests (tests/test_slurm.py), as root on a Debian 12 test machine.
#
#   bash .ci/slurm.sh up      install the Debian packages if missing, start munged, MariaDB, slurmdbd,
#                             slurmctld and slurmd, wait until the node is idle and sacct answers
#   bash .ci/slurm.sh down    stop the daemons that `up` started, by pid, newest first
#   bash .ci/slurm.sh status  say what is running
#
# Accounting (slurmdbd + MariaDB) is not optional: submitit reads job states from `sacct`; without it a
# cancelled or timed-out job is never noticed and `job.result()` hangs.
#
# `up` leaves alone a cluster that already answers (a real one, or a previous `up`), and records only the
# daemons it started itself in $STATE/started, so `down` never stops something it did not start.
# Everything listens on 127.0.0.1 only where the daemon allows it; nothing points anywhere but loopback.
set -euo pipefail

STATE=${PROXYATTENTION_SLURM_STATE:-/run/proxyattention-slurm}
DBPASS=${PROXYATTENTION_SLURM_DBPASS:-slurmdbpass}
CLUSTER=proxyattention
PIDFILES=(/run/munge/munged.pid /run/mysqld/mysqld.pid /run/slurmdbd.pid /run/slurmctld.pid /run/slurmd.pid)

say() { echo "[slurm.sh] $*"; }
die() { echo "[slurm.sh] error: $*" >&2; exit 1; }
waitfor() {  # waitfor SECONDS CMD...: poll every 0.2 s
  local n=$(( $1 * 5 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
started() { echo "$1" >> "$STATE/started"; }   # remember a pid file whose daemon `up` started

cluster_answers() {  # bounded: without a controller, sinfo retries for ~10 s before it fails
  command -v sinfo >/dev/null && timeout 3 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' \
    && timeout 5 sacct -n -X -S now-1minute >/dev/null 2>&1
}

install_packages() {
  local pkgs="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
  local missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  say "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Without systemd the postinst scripts print "invoke-rc.d: policy-rc.d denied execution"; expected.
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

write_slurm_conf() {
  local host mem
  host=$(hostname -s)
  mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 512 ))  # must not exceed real RAM
  install -d -o slurm -g slurm /var/spool/slurmctld /var/log/slurm
  install -d /var/spool/slurmd
  # Why these keys: linuxproc/task none need no cgroups; batch_sched_delay=0 makes a round trip ~1 s
  # instead of ~3 s; KillWait=5 because a cancelled job's python ignores SIGTERM and would hold the
  # node 30 s; MinJobAge=3600 keeps finished jobs visible to squeue for a while. A requeued job may
  # start again only after cred_expire (default 120 s) and the next scheduling pass (sched_interval,
  # default 60 s): shortened so the time-limit/requeue tests take seconds, not minutes.
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=${CLUSTER}
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${host} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=${DBPASS}
CONF
  chown slurm:slurm /etc/slurm/slurmdbd.conf
  chmod 600 /etc/slurm/slurmdbd.conf
}

up() {
  [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"
  local t0=$SECONDS
  if cluster_answers; then say "a Slurm cluster with accounting already answers; leaving it as it is"; return 0; fi
  install_packages
  install -d "$STATE"
  touch "$STATE/started"

  # munge: every Slurm message is signed with its key.
  [ -s /etc/munge/munge.key ] || mungekey --create --force
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  if ! alive /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    waitfor 10 sh -c 'munge -n | unmunge' || die "munged did not start"
    started /run/munge/munged.pid
  fi

  # Before writing slurm.conf: do not overwrite the config of a cluster that is merely down.
  if [ -s /etc/slurm/slurm.conf ] && ! grep -q "^ClusterName=${CLUSTER}$" /etc/slurm/slurm.conf; then
    die "/etc/slurm/slurm.conf belongs to another cluster; refusing to overwrite it (start that cluster instead)"
  fi
  write_slurm_conf

  # MariaDB for slurmdbd, on loopback only.
  install -d -o mysql -g mysql /run/mysqld
  if ! alive /run/mysqld/mysqld.pid; then
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
      --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
      --innodb-buffer-pool-size=1G --innodb-lock-wait-timeout=900 \
      >/var/log/slurm/mariadbd.log 2>&1 </dev/null &
    waitfor 30 mariadb-admin ping || die "MariaDB did not start; see /var/log/slurm/mariadbd.log"
    waitfor 5 test -s /run/mysqld/mysqld.pid
    started /run/mysqld/mysqld.pid
  fi
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DBPASS}';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

  if ! alive /run/slurmdbd.pid; then
    /usr/sbin/slurmdbd
    waitfor 30 sacctmgr -n show cluster || die "slurmdbd did not answer; see /var/log/slurm/slurmdbd.log"
    started /run/slurmdbd.pid
  fi
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

  if ! alive /run/slurmctld.pid; then /usr/sbin/slurmctld; started /run/slurmctld.pid; fi
  if ! alive /run/slurmd.pid; then /usr/sbin/slurmd; started /run/slurmd.pid; fi
  waitfor 30 cluster_answers || die "the node did not become idle; see /var/log/slurm/slurmctld.log and slurmd.log"
  say "up in $(( SECONDS - t0 )) s: $(sinfo -h -o '%P %D node(s) %c CPUs %T')"
}

down() {
  [ -s "$STATE/started" ] || { say "nothing to stop (no $STATE/started)"; return 0; }
  # Newest first: slurmd, slurmctld, slurmdbd, MariaDB, munged.
  tac "$STATE/started" | while read -r pf; do
    alive "$pf" || continue
    local pid; pid=$(cat "$pf")
    say "stopping $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "pid $pid still alive after 10 s; SIGKILL"; kill -KILL "$pid"; fi
  done
  # slurmctld leaves its pid file behind; a stale one makes `apt-get remove slurmctld` fail.
  for pf in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid; do alive "$pf" || rm -f "$pf"; done
  rm -f "$STATE/started"
}

status() {
  for pf in "${PIDFILES[@]}"; do
    if alive "$pf"; then echo "$pf: pid $(cat "$pf") running"; else echo "$pf: not running"; fi
  done
  cluster_answers && sinfo || echo "no cluster answers"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: bash .ci/slurm.sh up|down|status" >&2; exit 2 ;;
esac
