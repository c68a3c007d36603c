#!/usr/bin/env bash
# Stops the Ceph that tests/scripts/ceph-start.sh started in DIR: radosgw, then the OSD, then the monitor (radosgw
# hangs in its shutdown when the cluster goes first), each by the PID it recorded in DIR/run, with SIGTERM and after
# 10 s SIGKILL. Touches no other process; a daemon that is not running is skipped. DIR itself is left for the logs.
#
# usage: ceph-stop.sh DIR
set -uo pipefail

[ $# = 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
D=$(realpath -m "$1")

# gone PID: true when the process has exited (or is a zombie waiting for its parent).
gone() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
    [ -z "$state" ] || [ "${state#Z}" != "$state" ]
}

stop() {
    local pidfile=$D/run/$1.pid pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # only a Ceph daemon: a stale pid file must not make us kill a process that reused the PID
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in ceph-mon|ceph-osd|radosgw) ;; *) rm -f "$pidfile"; return 0 ;; esac
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do
        gone "$pid" && { rm -f "$pidfile"; return 0; }
        sleep 0.2
    done
    echo "ceph-stop: $1 (pid $pid) ignored SIGTERM for 10 s, killing it" >&2
    kill -9 "$pid" 2>/dev/null
    rm -f "$pidfile"
}

stop client.rgw.strata
stop osd.0
stop mon.a
