#!/usr/bin/env bash
# Crash-safe bitmap tracking (issue 14), in one run:
#  1. guest 4 KiB random writes over NBD (queue depth 16) to a fully written qcow2 with one enabled persistent
#     bitmap: qemu-storage-daemon, strata daemon with --crash-safe-bitmaps=off and =on; working sets of 1 % of the
#     disk (a guest's hot data) and the whole disk (the worst case: nearly every write starts a new region);
#  2. the over-copy after a crash: a 1 %-dirty workload (4 KiB writes at random offsets over the whole disk, until
#     1 % of its 64 KiB granules are dirty), kill -9, restart: bits the reloaded bitmap has beyond the truth.
# Usage: bench/crash-safe.sh [SIZE_MIB] [SECONDS] [RUNS]   (needs qemu-img, qemu-io, qemu-storage-daemon)
set -euo pipefail
SIZE_MIB=${1:-1024}
SECONDS_EACH=${2:-8}
RUNS=${3:-2}
source "$(dirname "$0")/common.sh" crashsafe
dotnet build -c Release -v q -nologo bench/Strata.Benchmarks >/dev/null
LOAD="dotnet $PWD/bench/Strata.Benchmarks/bin/Release/net10.0/Strata.Benchmarks.dll nbd-random-writes"
bytes=$((SIZE_MIB * 1048576))
qemu-img create -q -f qcow2 "$dir/disk.qcow2" "$bytes"
args=(); for ((off = 0; off < bytes; off += 268435456)); do args+=(-c "write -q -P 0x5a $off $((bytes - off < 268435456 ? bytes - off : 268435456))"); done
qemu-io -f qcow2 "${args[@]}" "$dir/disk.qcow2"
qemu-img bitmap --add "$dir/disk.qcow2" b0
sync

qmp() { # SOCKET JSON... -> prints each reply's "return"
    python3 - "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb"); f.readline()
f.write(b'{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
for c in sys.argv[2:]:
    f.write(c.encode() + b"\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" not in r: break
    print(json.dumps(r.get("return", r)))
PY
}
start() { # IMPL NAME [DAEMON OPTIONS...] -> sets $sock $qmpsock
    local impl=$1 name=$2; shift 2
    sock="$dir/$name.nbd"; qmpsock="$dir/$name.qmp"
    rm -f "$sock" "$qmpsock"
    local cmd="dotnet $STRATA_DLL daemon"; [[ $impl == qemu ]] && cmd=qemu-storage-daemon
    $cmd "$@" --blockdev driver=file,node-name=f0,filename="$dir/disk.qcow2" --blockdev driver=qcow2,node-name=d0,file=f0 \
         --chardev socket,id=m,path="$qmpsock",server=on,wait=off --monitor chardev=m \
         --nbd-server addr.type=unix,addr.path="$sock" --export type=nbd,id=e,node-name=d0,name=d0,writable=on >/dev/null 2>&1 &
    pids+=($!)
    while [[ ! -S $sock || ! -S $qmpsock ]]; do sleep 0.02; done
}
stop() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
crash() { kill -9 "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }

echo -e "working set\timpl\trun\twrites/s\tMiB/s\tp50 us\tp99 us"
for ((r = 0; r < RUNS; r++)); do
    for span in $((bytes / 100)) $bytes; do
        label="$((span / 1048576)) MiB"
        order=(qemu off on); ((r % 2)) && order=(on off qemu)
        for impl in "${order[@]}"; do
            case $impl in
                qemu) start qemu "q$r$span" ;;
                off) start strata "s$r$span" --crash-safe-bitmaps=off ;;
                on) start strata "c$r$span" --crash-safe-bitmaps=on ;;
            esac
            line=$($LOAD "$sock" d0 "$SECONDS_EACH" 16 "$span")
            stop
            name=$impl; [[ $impl != qemu ]] && name="strata crash-safe $impl"
            echo -e "$label\t$name\t$r\t$line"
        done
    done
done

echo
echo -e "over-copy after kill -9 (1 % of granules dirtied by random 4 KiB writes)\trun\ttrue dirty MiB\treloaded bitmap MiB\tover-copy % of disk"
for ((r = 0; r < RUNS; r++)); do
    start strata "o$r" --crash-safe-bitmaps=on
    qmp "$qmpsock" '{"execute":"block-dirty-bitmap-clear","arguments":{"node":"d0","name":"b0"}}' >/dev/null
    cmds=$(python3 - "$bytes" "$r" <<'PY'
import random, sys
size, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed); granules = set(); out = []
while len(granules) < size // 65536 // 100:
    off = rng.randrange(size // 4096) * 4096
    granules.add(off // 65536); out.append("write -q -P 3 %d 4096" % off)
print(len(granules)); print("\n".join(out))
PY
)
    truth=$(head -1 <<<"$cmds")
    args=(); while read -r c; do args+=(-c "$c"); done < <(tail -n +2 <<<"$cmds")
    qemu-io -f raw "${args[@]}" "nbd+unix:///d0?socket=$sock"
    crash
    start strata "o$r-after" --crash-safe-bitmaps=on
    count=$(qmp "$qmpsock" '{"execute":"query-named-block-nodes"}' | python3 -c "import json,sys; print([b for n in json.load(sys.stdin) if n['node-name']=='d0' for b in n.get('dirty-bitmaps',[]) if b.get('name')=='b0'][0]['count'])")
    stop
    python3 -c "t=$truth*65536; c=$count; print('1 %%-dirty workload\t$r\t%.1f\t%.1f\t%.2f' % (t/1048576, c/1048576, 100.0*(c-t)/$bytes))"
done
