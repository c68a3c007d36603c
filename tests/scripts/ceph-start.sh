#!/usr/bin/env bash
# The project's own one-node Ceph for the S3 tests: one monitor, one bluestore OSD on a sparse file and radosgw,
# every daemon on 127.0.0.1, cephx off, no systemd or cephadm (neither works in a container). DIR is wiped and
# holds everything: ceph.conf, the daemons' data, pid files (run/), logs (log/) and `s3.env`, the variables a
# client needs (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION). Returns once S3 answers.
# Stop with tests/scripts/ceph-stop.sh DIR.
#
# usage: ceph-start.sh DIR
# Ports (not Ceph's defaults 3300/6789/6800-7300/7480, so that a system Ceph or the reference setup can run beside):
#   STRATA_CEPH_MON_PORT (13300, msgr v2)  STRATA_CEPH_MON_V1_PORT (16789)  STRATA_CEPH_RGW_PORT (17480)
#   STRATA_CEPH_OSD_PORTS (16800-17299, the range the OSD binds in)
# Test user: STRATA_CEPH_ACCESS_KEY (strata-test), STRATA_CEPH_SECRET_KEY (strata-test-secret)
# STRATA_CEPH_TIMEOUT: seconds to wait for each daemon (default 120).
set -euo pipefail

[ $# = 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
D=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
mon_port=${STRATA_CEPH_MON_PORT:-13300}
mon_v1_port=${STRATA_CEPH_MON_V1_PORT:-16789}
rgw_port=${STRATA_CEPH_RGW_PORT:-17480}
osd_ports=${STRATA_CEPH_OSD_PORTS:-16800-17299}
access_key=${STRATA_CEPH_ACCESS_KEY:-strata-test}
secret_key=${STRATA_CEPH_SECRET_KEY:-strata-test-secret}
timeout=${STRATA_CEPH_TIMEOUT:-120}
endpoint="http://127.0.0.1:$rgw_port"

for tool in monmaptool ceph-mon ceph-osd radosgw radosgw-admin ceph uuidgen curl; do
    command -v "$tool" >/dev/null || { echo "ceph-start: '$tool' is not installed (apt-get install ceph-mon ceph-osd radosgw ceph-common curl uuid-runtime)" >&2; exit 1; }
done
# A cluster of an earlier run in DIR must be stopped before its files go.
[ -d "$D/run" ] && "$here/ceph-stop.sh" "$D"
for port in "$mon_port" "$mon_v1_port" "$rgw_port"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "ceph-start: port $port on 127.0.0.1 is already in use (set STRATA_CEPH_*_PORT)" >&2; exit 1
    fi
done
rm -rf "$D"
mkdir -p "$D"/{mon,osd0,run,log}

fsid=$(uuidgen)
mon_addrs="[v2:127.0.0.1:$mon_port,v1:127.0.0.1:$mon_v1_port]"
cat > "$D/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = $mon_addrs
public addr = 127.0.0.1
# without it the OSD's cluster side listens on every interface
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
# clients default to "secure", which needs cephx: radosgw would retry for ever
ms mon client mode = crc secure
# a CI disk may be fuller than the monitor's 30% / 5% free thresholds
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
run dir = $D/run
log file = $D/log/\$name.log
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
crash dir = $D/crash
keyring = /dev/null
[mon]
mon data = $D/mon
# a monitor batches map changes for 1 s by default; start-up is a dozen of them (OSD boot, radosgw's pools)
paxos propose interval = 0.05
paxos min wait = 0.01
[osd]
osd data = $D/osd0
osd objectstore = bluestore
ms bind port min = ${osd_ports%-*}
ms bind port max = ${osd_ports#*-}
# outside osd data, or mkfs makes the block symlink point at itself
bluestore block path = $D/osd0.block
bluestore block create = true
bluestore block size = 21474836480
bluestore fsck on mount = false
osd memory target = 1073741824
osd op num shards = 2
osd op num threads per shard = 1
[client.rgw.strata]
# tcp_nodelay: without it small keep-alive requests wait on Nagle + delayed ACK (~45 ms each)
rgw frontends = beast endpoint=127.0.0.1:$rgw_port tcp_nodelay=1
rgw dns name = 127.0.0.1
CONF
export CEPH_CONF="$D/ceph.conf"

fail() {
    echo "ceph-start: $1" >&2
    [ -n "${2:-}" ] && [ -f "$D/log/$2.log" ] && { echo "--- tail of $D/log/$2.log" >&2; tail -20 "$D/log/$2.log" >&2; }
    "$here/ceph-stop.sh" "$D" || true
    exit 1
}
# wait_for WHAT LOG CMD...: runs CMD every 0.2 s until it succeeds, or fails after $timeout s.
wait_for() {
    local what=$1 log=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -ge $deadline ] && fail "$what did not come up within $timeout s" "$log"
        sleep 0.2
    done
}

t0=$(date +%s%N)
monmaptool --create --fsid "$fsid" --addv a "$mon_addrs" "$D/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$D/monmap" >>"$D/log/setup.log" 2>&1 || fail "ceph-mon --mkfs failed" setup
ceph-mon -i a >>"$D/log/setup.log" 2>&1 || fail "ceph-mon did not start" mon.a
wait_for "the monitor" mon.a ceph -s --connect-timeout 2
t_mon=$(date +%s%N)

osd_uuid=$(uuidgen)
osd_id=$(ceph osd new "$osd_uuid") || fail "ceph osd new failed" mon.a
[ "$osd_id" = 0 ] || fail "expected OSD id 0 in a new cluster, got '$osd_id'"
ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$D/log/setup.log" 2>&1 || fail "ceph-osd --mkfs failed" osd.0
ceph-osd -i 0 >>"$D/log/setup.log" 2>&1 || fail "ceph-osd did not start" osd.0
osd_up() { ceph osd stat 2>/dev/null | grep -q " 1 up"; }
wait_for "the OSD" osd.0 osd_up
t_osd=$(date +%s%N)

# crc: cephx is off and a client daemon would otherwise insist on secure mode
radosgw -n client.rgw.strata --ms-mon-client-mode=crc >>"$D/log/setup.log" 2>&1 || fail "radosgw did not start" client.rgw.strata
wait_for "radosgw on $endpoint" client.rgw.strata curl -s -o /dev/null "$endpoint/"
radosgw-admin user create --uid=strata-test --display-name="strata tests" \
    --access-key="$access_key" --secret="$secret_key" >>"$D/log/setup.log" 2>&1 || fail "radosgw-admin user create failed" setup

cat > "$D/s3.env" <<ENV
AWS_ENDPOINT_URL=$endpoint
AWS_ACCESS_KEY_ID=$access_key
AWS_SECRET_ACCESS_KEY=$secret_key
AWS_REGION=us-east-1
AWS_EC2_METADATA_DISABLED=true
ENV
seconds() { local ms=$(( ($2 - $1) / 1000000 )); echo "$((ms / 1000)).$(printf %03d $((ms % 1000)))"; }
t_end=$(date +%s%N)
echo "S3 ready on $endpoint after $(seconds "$t0" "$t_end") s (monitor $(seconds "$t0" "$t_mon") s, OSD $(seconds "$t_mon" "$t_osd") s, radosgw $(seconds "$t_osd" "$t_end") s; CEPH_CONF=$D/ceph.conf, keys in $D/s3.env)"
