#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the SLURM profile for real (tests/test_slurm.py).
#
#   tests/slurm/slurm_local.sh install   apt-get Debian's SLURM, munge and MariaDB (exit 77: cannot install here)
#   tests/slurm/slurm_local.sh start     start munged, mariadbd, slurmdbd, slurmctld, slurmd; wait for the node
#   tests/slurm/slurm_local.sh status    the daemons and the node (exit 0 only when the node takes jobs)
#   tests/slurm/slurm_local.sh stop      cancel the jobs, then stop the daemons this script started (by PID)
#
# Why it looks like this:
# * CI machines and containers run without systemd, so the packages' init scripts start nothing: the daemons
#   are started here by hand and their PIDs recorded; `stop` signals exactly those PIDs, never by name, and
#   leaves alone a daemon that was already running before `start`.
# * Loopback only (node "localhost" at 127.0.0.1, MariaDB on its unix socket), no cgroups (linuxproc, task/none).
# * Partitions `cpu` (default) and `gpu` as named by profiles/slurm/config.yaml. Fake GPUs: gres.conf needs a
#   File= that is a character device, so each points at a private clone of /dev/null; jobs get a `gpu` TRES and
#   CUDA_VISIBLE_DEVICES, no CUDA.
# * Accounting through slurmdbd + MariaDB: the SLURM executor plugin polls `sacct` and hangs when it fails, and
#   the tests read AllocTRES, State and Comment (= the rule) from it.
# * Wall time: SLURM sends SIGTERM at the limit (checked about every 30 s) and SIGKILL KillWait s later.
set -euo pipefail

STATE=/var/lib/slurm-local            # our runtime records: started/<daemon> = "PID COMM", fakegpu/
CONF=/etc/slurm
LOGS=/var/log/slurm
CLUSTER=slurmlocal
DB_PASS=slurmlocal                    # the local accounting database's password (socket-only MariaDB)
MYSQL_SOCK=/run/mysqld/mysqld.sock
KILL_WAIT=${SLURM_LOCAL_KILL_WAIT:-30}  # s between SIGTERM and SIGKILL at a job's wall time (SLURM's default)
GPUS=${SLURM_LOCAL_GPUS:-2}           # fake GPUs: one per core here, so two trainings run side by side
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { echo "slurm_local: $*" >&2; }
die() { log "$*"; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || { log "must run as root"; exit "${1:-1}"; }
}

installed() {
    local bin
    for bin in slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mariadbd; do
        command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || return 1
    done
}

cmd_install() {
    require_root 77
    if installed; then log "already installed"; return 0; fi
    command -v apt-get >/dev/null 2>&1 || { log "apt-get not available"; exit 77; }
    export DEBIAN_FRONTEND=noninteractive
    timeout -k 10 300 apt-get update -qq || { log "apt-get update failed"; exit 77; }
    timeout -k 10 600 apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || { log "apt-get install ${PACKAGES[*]} failed"; exit 77; }
    installed || die "packages installed but daemons missing"
}

# --- process bookkeeping --------------------------------------------------------------------------------------

pid_alive() {  # PID COMM: that process runs under that name
    [ -n "${1:-}" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

pid_from_file() { [ -r "$1" ] && tr -dc '0-9' <"$1" || true; }

running() {  # NAME COMM PIDFILE: a live daemon named COMM is recorded in PIDFILE
    local pid
    pid=$(pid_from_file "$3")
    pid_alive "$pid" "$2"
}

record() {  # NAME COMM PIDFILE: remember that we started it, as soon as its pid file names it
    local pid i
    for i in $(seq 150); do
        pid=$(pid_from_file "$3")
        pid_alive "$pid" "$2" && break
        sleep 0.2
    done
    pid_alive "$pid" "$2" || die "$1 did not start (see $LOGS/$1.log)"
    echo "$pid $2" >"$STATE/started/$1"
}

ours() {  # NAME: started by this script and still that process
    local pid comm
    [ -r "$STATE/started/$1" ] || return 1
    read -r pid comm <"$STATE/started/$1"
    pid_alive "$pid" "$comm"
}

stop_daemon() {  # NAME: SIGTERM the recorded PID, SIGKILL after 30 s
    local pid comm i
    [ -r "$STATE/started/$1" ] || return 0
    read -r pid comm <"$STATE/started/$1"
    if pid_alive "$pid" "$comm"; then
        log "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 300); do pid_alive "$pid" "$comm" || break; sleep 0.1; done
        if pid_alive "$pid" "$comm"; then log "$1 ignored SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$STATE/started/$1"
}

wait_for() {  # SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local seconds=$1 what=$2 i
    shift 2
    for i in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${seconds} s waiting for $what"
}

# --- configuration --------------------------------------------------------------------------------------------

node_line() {
    # slurmd -C reports this machine; RealMemory above the real one makes the node INVAL, so take 85 % of it.
    local hw cpus boards sockets cores threads mem
    hw=$(slurmd -C | head -1)
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
    cpus=$(field CPUs) boards=$(field Boards) sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket) threads=$(field ThreadsPerCore) mem=$(field RealMemory)
    echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets" \
        "CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$((mem * 85 / 100)) Gres=gpu:$GPUS State=UNKNOWN"
}

slurm_conf() {
    cat <<EOF
# Written by tests/slurm/slurm_local.sh: one node on loopback, no cgroups, one fake GPU, accounting in slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
CommunicationParameters=NoInAddrAny
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=600
InactiveLimit=0
KillWait=$KILL_WAIT
OverTimeLimit=0
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
$(node_line)
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
EOF
}

gres_conf() {
    local i
    for i in $(seq 0 $((GPUS - 1))); do echo "NodeName=localhost Name=gpu File=$STATE/fakegpu/nvidia$i"; done
}

slurmdbd_conf() {
    cat <<EOF
# Written by tests/slurm/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

write_if_changed() {  # FILE MODE: stdin to FILE; exit 0 if the content changed
    local new
    new=$(cat)
    if [ -f "$1" ] && [ "$(cat "$1")" = "$new" ]; then return 1; fi
    printf '%s\n' "$new" >"$1"
    chmod "$2" "$1"
}

# --- start ----------------------------------------------------------------------------------------------------

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    runuser -u munge -- /usr/sbin/munged
    record munged munged /run/munge/munged.pid
    wait_for 20 munged sh -c 'munge -n </dev/null | unmunge'
}

start_mariadb() {
    if mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; then :; else
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOGS/mariadb-install.log" 2>&1
        # mariadbd does not daemonise: its own session, so it outlives this shell
        setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCK" \
            --pid-file=/run/mysqld/mysqld.pid --innodb-buffer-pool-size=1G --innodb-log-file-size=64M \
            --innodb-lock-wait-timeout=900 </dev/null >>"$LOGS/mariadbd.log" 2>&1 &
        record mariadbd mariadbd /run/mysqld/mysqld.pid
        wait_for 60 mariadbd mariadb-admin --socket="$MYSQL_SOCK" ping
    fi
    mariadb --socket="$MYSQL_SOCK" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
    if running slurmdbd slurmdbd /run/slurm/slurmdbd.pid; then
        [ "$DBD_CHANGED" = 0 ] && return 0
        ours slurmdbd || die "slurmdbd.conf changed but slurmdbd was not started by this script: restart it yourself"
        stop_daemon slurmdbd
    fi
    /usr/sbin/slurmdbd
    record slurmdbd slurmdbd /run/slurm/slurmdbd.pid
    wait_for 60 slurmdbd sacctmgr -n show cluster
}

write_configs() {  # sets SLURM_CHANGED and DBD_CHANGED (sacctmgr needs slurm.conf, so before any daemon)
    SLURM_CHANGED=0 DBD_CHANGED=0
    local i dev
    for i in $(seq 0 $((GPUS - 1))); do
        dev=$STATE/fakegpu/nvidia$i
        [ -e "$dev" ] || mknod -m 666 "$dev" c 1 3 2>/dev/null \
            || { log "mknod not allowed: a regular file as fake GPU (no CUDA_VISIBLE_DEVICES in jobs)"; : >"$dev"; }
    done
    slurm_conf | write_if_changed "$CONF/slurm.conf" 644 && SLURM_CHANGED=1
    gres_conf | write_if_changed "$CONF/gres.conf" 644 && SLURM_CHANGED=1
    slurmdbd_conf | write_if_changed "$CONF/slurmdbd.conf" 600 && DBD_CHANGED=1
    return 0
}

start_slurm() {
    local cluster_new=0
    if [ -z "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster)" ]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
        cluster_new=1
    fi
    if running slurmctld slurmctld /run/slurm/slurmctld.pid && { [ "$SLURM_CHANGED" = 1 ] || [ "$cluster_new" = 1 ]; }; then
        ours slurmctld || die "slurm.conf changed but slurmctld was not started by this script: restart it yourself"
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    if ! running slurmctld slurmctld /run/slurm/slurmctld.pid; then
        /usr/sbin/slurmctld
        record slurmctld slurmctld /run/slurm/slurmctld.pid
        wait_for 60 slurmctld scontrol ping
    fi
    if ! running slurmd slurmd /run/slurm/slurmd.pid; then
        /usr/sbin/slurmd -N localhost
        record slurmd slurmd /run/slurm/slurmd.pid
    fi
    wait_for 60 "the node to register" node_known
    case "$(node_state)" in
        *drain* | *down* | *fail*) scontrol update nodename=localhost state=resume ;;
    esac
    wait_for 60 "the node to take jobs" node_up
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -1; }
node_known() { [ -n "$(node_state)" ] && [ "$(node_state)" != unknown ]; }
node_up() { case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac; }

cmd_start() {
    require_root
    installed || die "SLURM is not installed: run '$0 install' first"
    mkdir -p "$STATE/started" "$STATE/fakegpu" "$CONF" "$LOGS" /run/slurm /var/spool/slurmctld /var/spool/slurmd
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o mysql -g mysql -m 755 /run/mysqld
    # NoInAddrAny binds slurmd and srun to the address the host name resolves to
    getent hosts "$(hostname)" >/dev/null || echo "127.0.0.1 $(hostname)" >>/etc/hosts
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    log "cluster $CLUSTER up: $(sinfo -h -o '%P %T %C %G' | tr '\n' ';')"
}

# --- stop / status --------------------------------------------------------------------------------------------

cmd_stop() {
    require_root
    local i
    if ours slurmctld; then  # cancel jobs only on a cluster this script runs, so no slurmstepd is left behind
        squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for i in $(seq $(((KILL_WAIT + 30) * 2))); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon slurmdbd
    stop_daemon mariadbd
    stop_daemon munged
}

cmd_status() {
    local name pid comm state=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if [ -r "$STATE/started/$name" ]; then
            read -r pid comm <"$STATE/started/$name"
            if pid_alive "$pid" "$comm"; then echo "$name: running (pid $pid, started here)"; else echo "$name: dead (was pid $pid)"; fi
        else
            echo "$name: not started by this script"
        fi
    done
    if command -v sinfo >/dev/null && node_up; then sinfo; else echo "node: not taking jobs"; state=1; fi
    return "$state"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
