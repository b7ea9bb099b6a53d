#!/usr/bin/env bash
# tests/slurm_cluster.sh - a REAL Slurm cluster on this machine, for the test suite: one node on
# localhost, or several nodes, each in its own network and UTS namespace.
#
# Installs Debian's slurmctld + slurmd + slurm-client + munge (and shellcheck, which the tests also
# need), writes /etc/slurm/slurm.conf and starts munged, slurmctld and slurmd directly (no systemd).
# Debian 12 (bookworm), run as root. Used by tests/test_slurm.py and tests/test_multinode.py; also
# handy by hand. One cluster per machine: starting the other mode stops the running one first.
#
# Usage:  tests/slurm_cluster.sh [start [--nodes N]|stop|status|install]
#   start    (default) install what is missing, write the config, start the daemons that are not
#            running, wait until every node accepts jobs. Idempotent: a second call is a ~0.1 s no-op;
#            a changed config (or mode) restarts the Slurm daemons.
#   start --nodes N   N nodes (1-9) named node1..nodeN: a bridge rbr0 (10.77.0.1/24) in the root
#            namespace, where slurmctld listens; per node a network namespace rnK with a veth on the
#            bridge (address 10.77.0.1K, its own loopback) and its own UTS namespace (hostname nodeK),
#            running one slurmd. The namespaces share the file system (a shared file system for free)
#            and the munge socket; /etc/netns/rnK/hosts lets the nodes resolve each other's names.
#   stop     cancel all jobs, stop the slurmds, slurmctld and munged (by their PID files), then kill
#            what is left in the node namespaces and delete them, the bridge and /etc/netns/rn*.
#   status   print the mode, the daemons' PIDs and `sinfo`; exit 0 only if the cluster is usable.
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
#   SLURM_CLUSTER_NODES=0         start's default for --nodes (0 = the single node on localhost).
#
# Files: /etc/slurm/slurm.conf, logs in /var/log/slurm/{slurmctld,slurmd,slurmd-nodeK}.log and
# /var/log/munge/munged.log, state in /var/spool/slurm{ctld,d}, PID files in /run/slurm, /run/munge.
# Exit status: 0 on success; 1 with a "slurm_cluster: ERROR:" line and the log tails on failure.
set -uo pipefail   # no -e: every failure is handled explicitly so it can print the logs

CPUS=${SLURM_CLUSTER_CPUS:-4}
CRED_EXPIRE=${SLURM_CLUSTER_CRED_EXPIRE:-10}
TIMEOUT=${SLURM_CLUSTER_TIMEOUT:-60}
PARTITION=${SLURM_CLUSTER_PARTITION:-debug}
NNODES=${SLURM_CLUSTER_NODES:-0}   # 0: single node on localhost; N: N namespace nodes

CONF=/etc/slurm/slurm.conf
PID_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=$PID_DIR/slurmctld.pid
SLURMD_PID=$PID_DIR/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
BRIDGE=rbr0
NET=10.77.0        # the test nodes' own subnet: controller .1 on the bridge, nodeK .1K
PKGS=(munge slurmctld slurmd slurm-client shellcheck iproute2 util-linux)  # ip, nsenter, unshare: the multi-node mode

log() { echo "slurm_cluster: $*" >&2; }

die() {
    local f
    echo "slurm_cluster: ERROR: $*" >&2
    for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd*.log /var/log/munge/munged.log; do
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

host() { hostname -s; }   # the controller's name; also the node's in single-node mode

nodes() { # the node names of this mode, one a line
    local k
    if [ "$NNODES" = 0 ]; then host; return; fi
    for ((k = 1; k <= NNODES; k++)); do echo "node$k"; done
}

node_addr() { echo "$NET.$((10 + $1))"; }   # K -> 10.77.0.1K

# Writes $CONF. Returns 0 when it was already identical, 10 when it changed.
write_conf() {
    local host mem new ctl_addr k node_lines spool pidf logf part rts
    host=$(host)
    [ -n "$host" ] || die "cannot determine the short hostname (hostname -s)"
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
    [ -n "$mem" ] || die "'slurmd -C' did not report RealMemory"
    # Headroom: a node that reports less memory than configured is drained ("Low RealMemory").
    if [ "$mem" -gt 2048 ]; then mem=$((mem - 512)); fi
    local shape="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
    if [ "$NNODES" = 0 ]; then
        # slurmd finds its node line by the short hostname, and slurmctld must resolve it.
        if ! getent hosts "$host" >/dev/null 2>&1; then
            log "hostname '$host' does not resolve: adding '127.0.0.1 $host' to /etc/hosts"
            echo "127.0.0.1 $host" >>/etc/hosts
        fi
        ctl_addr=127.0.0.1 spool=$SLURMD_SPOOL pidf=$SLURMD_PID logf=$LOG_DIR/slurmd.log part=$host
        rts="ReturnToService=2"
        node_lines="NodeName=$host NodeAddr=127.0.0.1 $shape"
    else
        # Every slurmd runs in its node's namespace with -N nodeK: %n keeps their files apart.
        ctl_addr=$NET.1 spool=$SLURMD_SPOOL/%n pidf=$PID_DIR/slurmd-%n.pid logf=$LOG_DIR/slurmd-%n.log
        part="node[1-$NNODES]" node_lines=""
        # 1, not 2: a node taken down by hand (scontrol update ... state=down, as the tests do) stays down until
        # resumed, instead of coming back as soon as its slurmd answers.
        rts="ReturnToService=1"
        for ((k = 1; k <= NNODES; k++)); do
            node_lines+="NodeName=node$k NodeAddr=$(node_addr "$k") $shape"$'\n'
        done
        node_lines=${node_lines%$'\n'}
    fi
    new=$(cat <<CONF
# Generated by tests/slurm_cluster.sh for the test suite: $([ "$NNODES" = 0 ] && echo "one node on localhost" || echo "$NNODES nodes in network namespaces").
# mode: nodes=$NNODES
ClusterName=reards
SlurmctldHost=${host}(${ctl_addr})
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds before they may run again (default 120).
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$pidf
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$logf
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
$rts
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
JobRequeue=1
# Advertise CPUS CPUs whatever the hardware says (a 2-core machine must run 2 tasks + an array).
SlurmdParameters=config_overrides
$node_lines
PartitionName=$PARTITION Nodes=$part Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
    mkdir -p "$(dirname "$CONF")"
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 0; fi
    { printf '%s\n' "$new" >"$CONF" && chmod 644 "$CONF"; } || die "cannot write $CONF"
    return 10
}

conf_nodes() { sed -n 's/^# mode: nodes=\([0-9]*\)$/\1/p' "$CONF" 2>/dev/null | head -n 1; }

# ---------------------------------------------------------------- network namespaces (--nodes N)
netns_names() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^rn[0-9]+$'; }

netns_del() { # K: kill what still runs in rnK (strays of killed jobs), delete it, its veth and hosts file
    local pids
    if netns_names | grep -qx "rn$1"; then
        pids=$(ip netns pids "rn$1" 2>/dev/null | tr '\n' ' ')
        # shellcheck disable=SC2086  # a list of pids
        if [ -n "${pids// /}" ]; then kill -9 $pids 2>/dev/null; sleep 0.2; fi
        ip netns del "rn$1" || die "cannot delete network namespace rn$1"
    fi
    ip link del "rv$1" 2>/dev/null
    rm -rf "/etc/netns/rn$1"
}

netns_ok() { # K: rnK exists and has its address up
    ip -n "rn$1" -4 -o addr show dev eth0 2>/dev/null | grep -q "inet $(node_addr "$1")/24"
}

net_up() {
    local k ns hosts
    if ! ip -4 -o addr show dev "$BRIDGE" 2>/dev/null | grep -q "inet $NET.1/24"; then
        ip link del "$BRIDGE" 2>/dev/null
        { ip link add "$BRIDGE" type bridge && ip addr add "$NET.1/24" dev "$BRIDGE"; } \
            || die "cannot create the bridge $BRIDGE with $NET.1/24 (ip link add ... type bridge)"
    fi
    ip link set "$BRIDGE" up || die "cannot bring the bridge $BRIDGE up"
    # Each node sees /etc/netns/rnK/hosts as /etc/hosts (as `ip netns exec` would): names resolve to the bridge.
    hosts=$(printf '127.0.0.1 localhost\n%s.1 %s\n' "$NET" "$(host)"
            for ((k = 1; k <= NNODES; k++)); do echo "$(node_addr "$k") node$k"; done)
    for ((k = 1; k <= NNODES; k++)); do
        if ! netns_ok "$k"; then
            netns_del "$k"
            { ip netns add "rn$k" && ip link add "rv$k" type veth peer name eth0 netns "rn$k" \
                && ip link set "rv$k" master "$BRIDGE" up \
                && ip -n "rn$k" addr add "$(node_addr "$k")/24" dev eth0 \
                && ip -n "rn$k" link set eth0 up && ip -n "rn$k" link set lo up; } \
                || die "cannot set up the network namespace rn$k (ip netns / veth)"
        fi
        mkdir -p "/etc/netns/rn$k"
        [ "$(cat "/etc/netns/rn$k/hosts" 2>/dev/null)" = "$hosts" ] || printf '%s\n' "$hosts" >"/etc/netns/rn$k/hosts"
    done
    for ns in $(netns_names); do   # nodes of an earlier, larger cluster
        k=${ns#rn}
        if [ "$k" -gt "$NNODES" ]; then netns_del "$k"; fi
    done
}

net_down() {
    local ns
    for ns in $(netns_names); do netns_del "${ns#rn}"; done
    ip link del "$BRIDGE" 2>/dev/null
    rmdir /etc/netns 2>/dev/null
    return 0
}

# ---------------------------------------------------------------- daemons
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

node_state() { sinfo -h -n "$1" -o '%T' 2>/dev/null | head -n 1; }

node_usable() {
    case "$(node_state "$1")" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

slurmd_pidfile() { if [ "$NNODES" = 0 ]; then echo "$SLURMD_PID"; else echo "$PID_DIR/slurmd-node$1.pid"; fi; }

start_slurmd() { # K (0: the single node)
    local pidf
    pidf=$(slurmd_pidfile "$1")
    alive "$pidf" && return 0
    rm -f "$pidf"
    if [ "$1" = 0 ]; then
        /usr/sbin/slurmd || die "slurmd failed to start"
    else
        install -d -o root -g root -m 0755 "$SLURMD_SPOOL/node$1"
        # The node's network namespace, its own UTS namespace (hostname, and `hostname -s` in jobs, is nodeK) and
        # a mount namespace that only puts the node's hosts file over /etc/hosts (a slave: later mounts still
        # show). Not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup, and slurmd refuses to start.
        # shellcheck disable=SC2016  # $1 and $2 are the inner shell's
        nsenter --net="/run/netns/rn$1" unshare --uts --mount --propagation slave \
            sh -c 'mount --bind "$2" /etc/hosts && hostname "$1" && exec /usr/sbin/slurmd -N "$1"' \
            sh "node$1" "/etc/netns/rn$1/hosts" || die "slurmd of node$1 failed to start in namespace rn$1"
    fi
    wait_until "the PID file $pidf" alive "$pidf"
}

start_slurm() { # CONFIG_CHANGED(0|1)
    local i k node resumed=" " ready
    install -d -o slurm -g slurm -m 0755 "$PID_DIR" "$LOG_DIR" "$CTLD_STATE"
    install -d -o root -g root -m 0755 "$SLURMD_SPOOL"
    if [ "$1" = 1 ] && { alive "$CTLD_PID" || slurmd_running; }; then
        log "slurm.conf changed: restarting slurmctld and the slurmds"
        stop_slurm
    fi
    if [ "$NNODES" = 0 ]; then net_down; else net_up; fi   # after stop_slurm: no slurmd in a namespace
    if ! alive "$CTLD_PID"; then
        rm -f "$CTLD_PID"
        # -c: cold start, forget jobs of an earlier cluster life (job ids still keep growing).
        /usr/sbin/slurmctld -c || die "slurmctld failed to start"
    fi
    wait_until "slurmctld to answer 'scontrol ping'" ctld_up
    if [ "$NNODES" = 0 ]; then start_slurmd 0; fi
    for ((k = 1; k <= NNODES; k++)); do start_slurmd "$k"; done
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        ready=1
        for node in $(nodes); do
            node_usable "$node" && continue
            ready=0
            # A node left down/drained by an earlier life of the cluster (or a test): resume it once.
            case "$(node_state "$node")" in
                down* | drain* | fail*)
                    if [ "${resumed/ $node /}" = "$resumed" ] && [ $i -gt 10 ]; then
                        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1
                        resumed+="$node "
                    fi
                    ;;
            esac
        done
        [ $ready = 1 ] && return 0
        sleep 0.2
    done
    sinfo -N -l >&2
    die "not every node is usable after ${TIMEOUT}s: $(for node in $(nodes); do printf '%s=%s ' "$node" "$(node_state "$node")"; done)"
}

slurmd_running() {
    local f
    for f in "$PID_DIR"/slurmd*.pid; do alive "$f" && return 0; done
    return 1
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

stop_slurm() { # every slurmd of either mode, then slurmctld
    local i f pids=()
    if alive "$CTLD_PID" && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        scancel --full --quiet --user=root 2>/dev/null
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
        for ((i = 0; i < 75; i++)); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    for f in "$PID_DIR"/slurmd*.pid; do   # in parallel: each slurmd takes ~2 s to shut down
        [ -e "$f" ] || continue
        stop_pidfile "$(basename "$f" .pid)" "$f" &
        pids+=($!)
    done
    [ ${#pids[@]} = 0 ] || wait "${pids[@]}"
    stop_pidfile slurmctld "$CTLD_PID"
}

do_start() {
    local changed=0 t0=$SECONDS
    [[ "$NNODES" =~ ^[0-9]$ ]] || die "--nodes $NNODES: expected 1 to 9 (0 = the single node on localhost)"
    do_install
    write_conf || changed=1
    start_munge
    start_slurm "$changed"
    log "ready in $((SECONDS - t0)) s: $(nodes | tr '\n' ' ')with $CPUS CPUs each, partition $PARTITION"
}

do_stop() {
    stop_slurm
    stop_pidfile munged "$MUNGE_PID"
    net_down
    log "stopped"
}

do_status() {
    local entry pidfile ok=0 k entries node
    NNODES=$(conf_nodes)
    NNODES=${NNODES:-0}
    entries="munged:$MUNGE_PID slurmctld:$CTLD_PID"
    if [ "$NNODES" = 0 ]; then
        echo "mode: single node ($(host), localhost)"
        entries+=" slurmd:$SLURMD_PID"
    else
        echo "mode: nodes=$NNODES (network namespaces rn1..rn$NNODES on $BRIDGE)"
        for ((k = 1; k <= NNODES; k++)); do entries+=" slurmd-node$k:$(slurmd_pidfile "$k")"; done
    fi
    for entry in $entries; do
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
        for node in $(nodes); do node_usable "$node" || ok=1; done
    fi
    return $ok
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages, writes /etc/slurm and starts daemons)"

cmd=${1:-start}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) [ $# -ge 2 ] || die "--nodes needs a value"; NNODES=$2; shift 2 ;;
        --nodes=*) NNODES=${1#*=}; shift ;;
        *) echo "usage: $0 [start [--nodes N]|stop|status|install]" >&2; exit 2 ;;
    esac
done
case "$cmd" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    install) do_install ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' ;;
    *)
        echo "usage: $0 [start [--nodes N]|stop|status|install]" >&2
        exit 2
        ;;
esac
