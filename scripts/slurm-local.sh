#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for development and CI (see ../shared/SLURM.md).
#
#   scripts/slurm-local.sh up       install (apt) if needed, start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   scripts/slurm-local.sh status   show the daemons and the node
#   scripts/slurm-local.sh down     stop every daemon by its PID
#   scripts/slurm-local.sh env      print `export SLURM_CONF=...`
#
# Everything lives in $TRINITY_SLURM_DIR (default /tmp/trinity-slurm): configs, state, logs, PIDs.
# The node offers max(nproc, $TRINITY_SLURM_MIN_CPUS (default 4)) CPUs: multi-task training jobs fit.
# Clients need SLURM_CONF=$TRINITY_SLURM_DIR/etc/slurm.conf (`up` and `env` print it).
# Runs as root (munged runs as the munge user, MariaDB as mysql).
set -euo pipefail

DIR=${TRINITY_SLURM_DIR:-/tmp/trinity-slurm}
ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
HOST=$(hostname -s)
CONF=$ETC/slurm.conf
DB_SOCK=$DIR/mysql/mysqld.sock  # MariaDB runs as mysql: its socket lives in its own folder
MIN_CPUS=${TRINITY_SLURM_MIN_CPUS:-4}

say() { echo "slurm-local: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v mariadbd >/dev/null \
        && command -v slurmdbd >/dev/null; then
        return
    fi
    say "installing slurm-wlm, munge, slurmdbd, mariadb-server (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
}

write_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool" "$DIR/mysql"
    local cpus mem
    # At least MIN_CPUS slots, so a training node of 4 ranks (4 tasks x 1 CPU) fits on a 2-core machine;
    # config_overrides lets slurmd accept more CPUs than it detects (the tasks then share the cores).
    cpus=$(nproc)
    if [ "$cpus" -lt "$MIN_CPUS" ]; then cpus=$MIN_CPUS; fi
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat >"$CONF" <<EOF
ClusterName=trinity
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPidFile=$RUN/slurmctld.slurm.pid
SlurmdPidFile=$RUN/slurmd.slurm.pid
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
DependencyParameters=kill_invalid_depend
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
MailProg=/bin/true
MaxArraySize=1001
KillWait=10
MinJobAge=300
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.slurm.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- munged --force
    fi
    pgrep -x munged >"$RUN/munged.pid"
}

start_mariadb() {
    if [ ! -d "$DIR/mysql/mysql" ]; then
        chown -R mysql:mysql "$DIR/mysql"
        mariadb-install-db --user=mysql --datadir="$DIR/mysql" >"$LOG/mariadb-install.log" 2>&1
    fi
    chown -R mysql:mysql "$DIR/mysql"
    if [ ! -S "$DB_SOCK" ] || ! mariadb --socket="$DB_SOCK" -e 'select 1' >/dev/null 2>&1; then
        rm -f "$DB_SOCK"
        mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --bind-address=127.0.0.1 --port=3306 \
            --socket="$DB_SOCK" >"$LOG/mariadb.log" 2>&1 &
        echo $! >"$RUN/mariadb.pid"
        for _ in $(seq 1 60); do
            mariadb --socket="$DB_SOCK" -e 'select 1' >/dev/null 2>&1 && break
            sleep 0.5
        done
    fi
    mariadb --socket="$DB_SOCK" <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
}

daemon_alive() { [ -s "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start_daemon() {  # name, command...
    local name=$1
    shift
    if daemon_alive "$name"; then
        return
    fi
    "$@" >"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"
}

wait_for() {  # description, seconds, command...
    local what=$1 seconds=$2
    shift 2
    for _ in $(seq 1 $((seconds * 2))); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    say "timed out waiting for $what; logs in $LOG"
    return 1
}

up() {
    install_packages
    write_configs
    start_munge
    start_mariadb
    export SLURM_CONF=$CONF
    start_daemon slurmdbd slurmdbd -D  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for slurmdbd 60 bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
    start_daemon slurmctld slurmctld -D -f "$CONF"
    wait_for slurmctld 60 scontrol ping
    # the cluster must be known to the accounting database before jobs are accounted
    sacctmgr -i add cluster trinity >/dev/null 2>&1 || true
    start_daemon slurmd slurmd -D -f "$CONF" -N "$HOST"
    wait_for "node $HOST" 60 bash -c "sinfo -h -n $HOST -o %t | grep -Eq '^(idle|mix|alloc)'"
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for sacct 60 sacct -n -X -S now
    say "up: $(sinfo -h -o '%P %D %t')"
    echo "export SLURM_CONF=$CONF"
}

down() {
    for name in slurmd slurmctld slurmdbd mariadb; do
        if daemon_alive "$name"; then
            kill "$(cat "$RUN/$name.pid")" 2>/dev/null || true
        fi
    done
    sleep 1
    for name in slurmd slurmctld slurmdbd mariadb; do
        if daemon_alive "$name"; then
            kill -9 "$(cat "$RUN/$name.pid")" 2>/dev/null || true
        fi
        rm -f "$RUN/$name.pid"
    done
    say "down"
}

status() {
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if daemon_alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if [ -f "$CONF" ]; then
        SLURM_CONF=$CONF sinfo 2>&1 || true
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
