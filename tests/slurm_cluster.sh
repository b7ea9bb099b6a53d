#!/usr/bin/env bash
# tests/slurm_cluster.sh - a REAL single-node Slurm cluster on this machine, for the test suite.
#
# Installs Debian's slurmctld + slurmd + slurm-client + munge (and shellcheck, which the tests also
# need), writes /etc/slurm/slurm.conf for localhost and starts munged, slurmctld and slurmd directly
# (no systemd). Debian 12 (bookworm), run as root. Used by tests/test_slurm.py; also handy by hand.
#
# Usage:  tests/slurm_cluster.sh [start|stop|status|install]
#   start    (default) install what is missing, write the config, start the daemons that are not
#            running, wait until the node accepts jobs. Idempotent: a second call is a ~0.1 s no-op;
#            a changed config restarts the Slurm daemons.
#   stop     cancel all jobs, stop slurmd, slurmctld and munged (by their PID files).
#   status   print the daemons' PIDs and `sinfo`; exit 0 only if the cluster is usable.
#   install  only install the packages.
#
# Environment (all optional):
#   SLURM_CLUSTER_CPUS=4          CPUs the node advertises. More than the real cores on purpose
#                                 (SlurmdParameters=config_overrides) so a 2-task training job and an
#                                 array job can run at the same time on a 2-core machine.
#   SLURM_CLUSTER_CRED_EXPIRE=10  job credential lifetime (s). Slurm also holds a requeued job this
#                                 long before it may start again (default 120 s; too slow for tests).
#   SLURM_CLUSTER_TIMEOUT=60      seconds to wait for each daemon / for the node.
#   SLURM_CLUSTER_PARTITION=debug name of the single (default) partition.
#
# Files: /etc/slurm/slurm.conf, logs in /var/log/slurm/{slurmctld,slurmd}.log and
# /var/log/munge/munged.log, state in /var/spool/slurm{ctld,d}, PID files in /run/slurm, /run/munge.
# Exit status: 0 on success; 1 with a "slurm_cluster: ERROR:" line and the log tails on failure.
set -uo pipefail   # no -e: every failure is handled explicitly so it can print the logs

CPUS=${SLURM_CLUSTER_CPUS:-4}
CRED_EXPIRE=${SLURM_CLUSTER_CRED_EXPIRE:-10}
TIMEOUT=${SLURM_CLUSTER_TIMEOUT:-60}
PARTITION=${SLURM_CLUSTER_PARTITION:-debug}

CONF=/etc/slurm/slurm.conf
PID_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=$PID_DIR/slurmctld.pid
SLURMD_PID=$PID_DIR/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
PKGS=(munge slurmctld slurmd slurm-client shellcheck)

log() { echo "slurm_cluster: $*" >&2; }

die() {
    local f
    echo "slurm_cluster: ERROR: $*" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -s "$f" ]; then
            echo "---- last 20 lines of $f ----" >&2
            tail -n 20 "$f" >&2
        fi
    done
    exit 1
}

alive() { # PIDFILE -> success if the process it names is running
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

wait_until() { # DESCRIPTION COMMAND... : poll every 0.2 s for up to TIMEOUT seconds
    local what=$1 i
    shift
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${TIMEOUT}s waiting for $what"
}

do_install() {
    local missing=() p rc=0 own_policy=0
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found: cannot install ${missing[*]}"
    log "installing ${missing[*]} (apt-get, no recommends) ..."
    # The packages' postinst would try to start the daemons through init scripts, before any
    # slurm.conf exists; a policy-rc.d that says "no" stops that (kept if the image has one).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || rc=$?
    if [ $rc -eq 0 ]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    fi
    [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc -eq 0 ] || die "apt-get failed (exit $rc) installing ${missing[*]}"
    for p in sbatch srun scontrol slurmctld slurmd munged shellcheck; do
        command -v "$p" >/dev/null || die "packages installed but '$p' is not on PATH"
    done
}

node() { hostname -s; }

# Writes $CONF. Returns 0 when it was already identical, 10 when it changed.
write_conf() {
    local host mem new
    host=$(node)
    [ -n "$host" ] || die "cannot determine the short hostname (hostname -s)"
    # slurmd finds its node line by the short hostname, and slurmctld must resolve it.
    if ! getent hosts "$host" >/dev/null 2>&1; then
        log "hostname '$host' does not resolve: adding '127.0.0.1 $host' to /etc/hosts"
        echo "127.0.0.1 $host" >>/etc/hosts
    fi
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
    [ -n "$mem" ] || die "'slurmd -C' did not report RealMemory"
    # Headroom: a node that reports less memory than configured is drained ("Low RealMemory").
    if [ "$mem" -gt 2048 ]; then mem=$((mem - 512)); fi
    new=$(cat <<EOF
# Generated by tests/slurm_cluster.sh: single-node Slurm on localhost for the test suite.
ClusterName=reards
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds before they may run again (default 120).
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
MpiDefault=none
# Fewest assumptions about the machine: no cgroups, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# bf_interval=1: a job submitted right after another one starts within ~1 s, not 2-3 s.
SchedulerParameters=bf_interval=1,sched_min_interval=0,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
JobRequeue=1
# Advertise CPUS CPUs whatever the hardware says (a 2-core machine must run 2 tasks + an array).
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
    mkdir -p "$(dirname "$CONF")"
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 0; fi
    { printf '%s\n' "$new" >"$CONF" && chmod 644 "$CONF"; } || die "cannot write $CONF"
    return 10
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_works && return 0
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key --force || die "mungekey failed"
    fi
    # munged refuses a key or folders that others can read or write.
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    rm -f "$MUNGE_PID"
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start"
    wait_until "munged (munge -n | unmunge)" munge_works
}

node_state() { sinfo -h -n "$(node)" -o '%T' 2>/dev/null | head -n 1; }

node_usable() {
    case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurm() { # CONFIG_CHANGED(0|1)
    local i resumed=0
    install -d -o slurm -g slurm -m 0755 "$PID_DIR" "$LOG_DIR" "$CTLD_STATE"
    install -d -o root -g root -m 0755 "$SLURMD_SPOOL"
    if [ "$1" = 1 ] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
        log "slurm.conf changed: restarting slurmctld and slurmd"
        stop_slurm
    fi
    if ! alive "$CTLD_PID"; then
        rm -f "$CTLD_PID"
        # -c: cold start, forget jobs of an earlier cluster life (job ids still keep growing).
        /usr/sbin/slurmctld -c || die "slurmctld failed to start"
    fi
    wait_until "slurmctld to answer 'scontrol ping'" ctld_up
    if ! alive "$SLURMD_PID"; then
        rm -f "$SLURMD_PID"
        /usr/sbin/slurmd || die "slurmd failed to start"
    fi
    wait_until "slurmd's PID file" alive "$SLURMD_PID"
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        node_usable && return 0
        # A node left down/drained by an earlier life of the cluster: resume it once.
        case "$(node_state)" in
            down* | drain* | fail*)
                if [ $resumed = 0 ] && [ $i -gt 10 ]; then
                    scontrol update NodeName="$(node)" State=RESUME >/dev/null 2>&1
                    resumed=1
                fi
                ;;
        esac
        sleep 0.2
    done
    scontrol show node "$(node)" >&2
    die "node $(node) is not usable after ${TIMEOUT}s (state: $(node_state))"
}

stop_pidfile() { # NAME PIDFILE
    local pid i
    if ! alive "$2"; then rm -f "$2"; return 0; fi
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null
    for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$1 (pid $pid) ignored SIGTERM for 15 s: sending SIGKILL"
        kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$2"
}

stop_slurm() {
    local i
    if alive "$CTLD_PID" && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        scancel --full --quiet --user=root 2>/dev/null
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
        for ((i = 0; i < 75; i++)); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
}

do_start() {
    local changed=0 t0=$SECONDS
    do_install
    write_conf || changed=1
    start_munge
    start_slurm "$changed"
    log "ready in $((SECONDS - t0)) s: node $(node) is $(node_state) with $CPUS CPUs, partition $PARTITION"
}

do_stop() {
    stop_slurm
    stop_pidfile munged "$MUNGE_PID"
    log "stopped"
}

do_status() {
    local entry pidfile ok=0
    for entry in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        pidfile=${entry#*:}
        if alive "$pidfile"; then
            echo "${entry%%:*}: running (pid $(cat "$pidfile"))"
        else
            echo "${entry%%:*}: not running"
            ok=1
        fi
    done
    if [ $ok = 0 ]; then
        sinfo
        node_usable || ok=1
    fi
    return $ok
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages, writes /etc/slurm and starts daemons)"

case "${1:-start}" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    install) do_install ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' ;;
    *)
        echo "usage: $0 [start|stop|status|install]" >&2
        exit 2
        ;;
esac
