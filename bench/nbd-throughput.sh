#!/usr/bin/env bash
# NBD export throughput, strata daemon against qemu-storage-daemon, same image, alternating runs:
#  - nbdcopy of a whole fully written qcow2 export to null: (read)
#  - nbdcopy of a raw file into a writable export (write), with 0 and with 4 enabled dirty bitmaps (strata)
# Usage: bench/nbd-throughput.sh [SIZE_MIB] [RUNS]     (needs qemu-img, qemu-io, qemu-storage-daemon, nbdcopy)
set -euo pipefail
SIZE_MIB=${1:-4096}
RUNS=${2:-3}
source "$(dirname "$0")/common.sh" nbdb
STRATA="dotnet $STRATA_DLL daemon"
bytes=$((SIZE_MIB * 1048576))
qemu-img create -q -f qcow2 "$dir/src.qcow2" "$bytes"
args=(); for ((off = 0; off < bytes; off += 268435456)); do args+=(-c "write -q -P 0x5a $off 268435456"); done
qemu-io -f qcow2 "${args[@]}" "$dir/src.qcow2"
head -c "$bytes" /dev/urandom > "$dir/data.raw"
sync

start() { # IMPL NAME IMAGE WRITABLE BITMAPS -> sets $sock
    local impl=$1 name=$2 image=$3 writable=$4 nb=$5
    sock="$dir/$name.nbd"; local qmp="$dir/$name.qmp"
    rm -f "$sock" "$qmp"
    local cmd=$STRATA; [[ $impl == qemu ]] && cmd=qemu-storage-daemon
    $cmd --blockdev driver=file,node-name=f0,filename="$image" --blockdev driver=qcow2,node-name=d0,file=f0 \
         --chardev socket,id=m,path="$qmp",server=on,wait=off --monitor chardev=m \
         --nbd-server addr.type=unix,addr.path="$sock" --export type=nbd,id=e,node-name=d0,name=d0,writable=$writable >/dev/null 2>&1 &
    pids+=($!)
    while [[ ! -S $sock || ! -S $qmp ]]; do sleep 0.02; done
    if ((nb > 0)); then
        python3 - "$qmp" "$nb" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb"); f.readline()
f.write(b'{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
for i in range(int(sys.argv[2])):
    f.write(json.dumps({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d0", "name": "b%d" % i}}).encode() + b"\n"); f.flush(); f.readline()
PY
    fi
}
stop() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
mibps() { python3 -c "print('%.0f' % ($bytes / 1048576 / $1))"; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); python3 -c "print('%.3f' % ($t1 - $t0))"; }

echo -e "scenario\timpl\trun\tseconds\tMiB/s"
for ((r = 0; r < RUNS; r++)); do
    order=(qemu strata); ((r % 2)) && order=(strata qemu)
    for impl in "${order[@]}"; do
        start "$impl" "r$impl$r" "$dir/src.qcow2" off 0
        t=$(timed nbdcopy "nbd+unix:///d0?socket=$sock" null:); stop
        echo -e "read ${SIZE_MIB} MiB (nbdcopy -> null:)\t$impl\t$r\t$t\t$(mibps "$t")"
        for nb in 0 4; do
            [[ $impl == qemu && $nb == 4 ]] && continue
            qemu-img create -q -f qcow2 "$dir/dst.qcow2" "$bytes"; sync
            start "$impl" "w$impl$r$nb" "$dir/dst.qcow2" on "$nb"
            t=$(timed nbdcopy "$dir/data.raw" "nbd+unix:///d0?socket=$sock"); stop
            echo -e "write ${SIZE_MIB} MiB (nbdcopy raw -> export, $nb bitmaps)\t$impl\t$r\t$t\t$(mibps "$t")"
        done
    done
done
