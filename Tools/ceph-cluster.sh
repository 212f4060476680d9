#!/usr/bin/env bash
# A throwaway one-node Ceph cluster in a folder, for tests and benchmarks (docs/CEPH.md):
#
#   Tools/ceph-cluster.sh start DIR    # one monitor + one OSD on 127.0.0.1, pool "rbd"; prints the conf path
#   Tools/ceph-cluster.sh status DIR   # exit 0 when the pool answers
#   Tools/ceph-cluster.sh stop DIR     # stops exactly the processes start recorded (DIR/pids), keeps DIR
#   Tools/ceph-cluster.sh restart DIR  # starts the stopped daemons again on their data (a cluster that came back)
#   Tools/ceph-cluster.sh pause DIR / resume DIR   # SIGSTOP / SIGCONT the daemons (a cluster that is away)
#
# Everything lives in DIR: its own ceph.conf, fsid and keyring (cephx), a monitor on a free port of
# 127.0.0.1, BlueStore on a sparse file (DIR/osd.0.block, outside the OSD folder: BlueStore refuses a block
# symlink inside it), no manager (pools, rbd, snapshots and clones do not need one), pool size 1. Clients
# use `CEPH_CONF=DIR/ceph.conf` (the admin keyring is named in it). Start is bounded (CEPH_START_TIMEOUT,
# default 120 s) and leaves nothing running when it fails; every `ceph` call has a connect timeout and
# runs under `timeout`, because the CLI waits 300 s for a monitor by default.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|restart|status|pause|resume DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
command=$1
DIR=$(realpath -m "$2")
CONF=$DIR/ceph.conf
PIDS=$DIR/pids

# The CLI, bounded: at most $1 seconds, a monitor or not.
cephcli() {
    local limit=$1
    shift
    timeout -k 2 "$limit" ceph --conf "$CONF" --connect-timeout "$limit" "$@"
}

# A free TCP port on 127.0.0.1 (the kernel picks it; a race with another binder is unlikely and fails loudly).
free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_cluster() {
    [ -f "$PIDS" ] || return 0
    local pids=()
    while read -r pid name; do
        # Only a process that is still the daemon we started (its command line names our conf).
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CONF"; then
            kill -CONT "$pid" 2>/dev/null || true
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done <"$PIDS"
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$PIDS"
}

signal_cluster() {
    [ -f "$PIDS" ] || { echo "ceph-cluster: no cluster recorded in $DIR" >&2; exit 1; }
    while read -r pid name; do
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CONF"; then
            kill "-$1" "$pid"
        fi
    done <"$PIDS"
}

# Starts a daemon in the foreground mode, detached from us, and records its pid.
spawn() {
    local name=$1
    shift
    setsid "$@" -f --conf "$CONF" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo "$! $name" >>"$PIDS"
}

start_cluster() {
    local deadline=$((SECONDS + ${CEPH_START_TIMEOUT:-120}))
    if [ -f "$PIDS" ]; then
        echo "ceph-cluster: $DIR already has a cluster (stop it first)" >&2
        exit 1
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR/mon.a" "$DIR/osd.0" "$DIR/run" "$DIR/log"
    local fsid osd_uuid port
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    port=$(free_port)
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.\$pid.asok
log file = $DIR/log/\$name.log
pid file = $DIR/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon data avail warn = 1
mon data avail crit = 0
mon mgr mkfs grace = 31536000
mon warn on pool no redundancy = false
[mon]
mon data = $DIR/mon.a
[osd]
osd data = $DIR/osd.0
osd objectstore = bluestore
bluestore block path = $DIR/osd.0.block
bluestore block create = true
bluestore block size = ${CEPH_OSD_SIZE:-21474836480}
bluestore debug enforce settings = ssd
bluestore fsck on mount = false
osd memory target = 1073741824
EOF
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$DIR/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$DIR/keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null
    ceph-mon --conf "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" >>"$DIR/log/mkfs.out" 2>&1
    spawn mon.a ceph-mon -i a
    until cephcli 5 mon stat >/dev/null 2>&1; do
        [ $SECONDS -lt "$deadline" ] || fail "the monitor did not answer"
        sleep 0.5
    done
    cephcli 20 osd new "$osd_uuid" 0 >/dev/null
    ceph-osd --conf "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$DIR/log/mkfs.out" 2>&1 ||
        fail "ceph-osd --mkfs failed (see $DIR/log/mkfs.out)"
    spawn osd.0 ceph-osd -i 0
    cephcli 20 osd pool create rbd 32 32 >/dev/null 2>&1
    cephcli 20 osd pool application enable rbd rbd >/dev/null 2>&1
    wait_usable "$deadline"
    echo "$CONF"
}

# Waits until an object can be written and read back (the OSD is up and its PGs are active).
wait_usable() {
    until timeout 10 rados --conf "$CONF" -p rbd put ceph-cluster-probe "$CONF" 2>/dev/null &&
        timeout 10 rados --conf "$CONF" -p rbd stat ceph-cluster-probe >/dev/null 2>&1; do
        [ $SECONDS -lt "$1" ] || fail "the pool did not become usable"
        sleep 0.5
    done
    timeout 10 rados --conf "$CONF" -p rbd rm ceph-cluster-probe
}

restart_cluster() {
    [ -f "$CONF" ] || { echo "ceph-cluster: no cluster in $DIR" >&2; exit 1; }
    [ ! -f "$PIDS" ] || { echo "ceph-cluster: $DIR is running (stop it first)" >&2; exit 1; }
    spawn mon.a ceph-mon -i a
    spawn osd.0 ceph-osd -i 0
    wait_usable $((SECONDS + ${CEPH_START_TIMEOUT:-120}))
}

fail() {
    echo "ceph-cluster: $1 within ${CEPH_START_TIMEOUT:-120} s (logs in $DIR/log)" >&2
    stop_cluster
    exit 1
}

case $command in
start) start_cluster ;;
stop) stop_cluster ;;
restart) restart_cluster ;;
status)
    [ -f "$PIDS" ] || exit 1
    timeout 15 rados --conf "$CONF" -p rbd ls >/dev/null 2>&1
    ;;
pause) signal_cluster STOP ;;
resume) signal_cluster CONT ;;
*) usage ;;
esac
