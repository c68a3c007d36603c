#!/usr/bin/env bash
# NBD throughput on a raw disk with a qcow2 of metadata (data_file, data_file_raw=on) against the same raw disk served
# bare (driver=raw), strata daemon against qemu-storage-daemon on the same files, alternating runs:
#  - read: nbdcopy of the whole (fully written) export to null:
#  - write: nbdcopy of a raw file of random data into the writable export; for the metadata qcow2 also with one
#    enabled persistent dirty bitmap (what incremental backups keep)
# The metadata qcow2 is made by `strata img create --adopt-data-file` over the raw disk (no data copied).
# Usage: bench/rawdisk.sh [SIZE_MIB] [RUNS]     (needs qemu-img, qemu-storage-daemon, nbdcopy)
set -euo pipefail
SIZE_MIB=${1:-1024}
RUNS=${2:-3}
source "$(dirname "$0")/common.sh" rawdisk
STRATA="dotnet $STRATA_DLL daemon"
bytes=$((SIZE_MIB * 1048576))
head -c "$bytes" /dev/urandom > "$dir/disk.raw"
head -c "$bytes" /dev/urandom > "$dir/data.raw"
dotnet "$STRATA_DLL" img create -q -f qcow2 --adopt-data-file -o data_file="$dir/disk.raw",data_file_raw=on "$dir/disk.qcow2"
sync

start() { # IMPL NAME LAYOUT(meta|raw) WRITABLE BITMAPS -> sets $sock and $qmpsock
    local impl=$1 name=$2 layout=$3 writable=$4 nb=$5
    sock="$dir/$name.nbd"; local qmp="$dir/$name.qmp"
    rm -f "$sock" "$qmp"
    local cmd=$STRATA; [[ $impl == qemu ]] && cmd=qemu-storage-daemon
    local nodes=(--blockdev driver=file,node-name=f0,filename="$dir/disk.qcow2" --blockdev driver=qcow2,node-name=d0,file=f0)
    [[ $layout == raw ]] && nodes=(--blockdev driver=file,node-name=f0,filename="$dir/disk.raw" --blockdev driver=raw,node-name=d0,file=f0)
    $cmd "${nodes[@]}" --chardev socket,id=m,path="$qmp",server=on,wait=off --monitor chardev=m \
         --nbd-server addr.type=unix,addr.path="$sock" --export type=nbd,id=e,node-name=d0,name=d0,writable=$writable >/dev/null 2>&1 &
    pids+=($!)
    while [[ ! -S $sock || ! -S $qmp ]]; do sleep 0.02; done
    for ((i = 0; i < nb; i++)); do
        qmp_call "$qmp" block-dirty-bitmap-add "{\"node\": \"d0\", \"name\": \"b$i\", \"persistent\": true}"
    done
    qmpsock=$qmp
}
qmp_call() { # QMP_SOCKET COMMAND ARGUMENTS_JSON: one command on a connection of its own, which must succeed
    python3 - "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb"); f.readline()
f.write(b'{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
f.write(json.dumps({"execute": sys.argv[2], "arguments": json.loads(sys.argv[3])}).encode() + b"\n"); f.flush()
while True:
    reply = json.loads(f.readline())
    if "event" not in reply: break
assert "return" in reply, reply
PY
}
# Stops the daemon the way a user does (QMP quit is not needed: SIGTERM closes the images, storing the bitmaps).
stop() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
mibps() { python3 -c "print('%.0f' % ($bytes / 1048576 / $1))"; }
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); python3 -c "print('%.3f' % ($t1 - $t0))"; }

echo -e "scenario\tlayout\timpl\trun\tseconds\tMiB/s"
for ((r = 0; r < RUNS; r++)); do
    order=(qemu strata); ((r % 2)) && order=(strata qemu)
    for layout in meta raw; do
        for impl in "${order[@]}"; do
            start "$impl" "r$impl$r$layout" "$layout" off 0
            t=$(timed nbdcopy "nbd+unix:///d0?socket=$sock" null:); stop
            echo -e "read ${SIZE_MIB} MiB (nbdcopy -> null:)\t$layout\t$impl\t$r\t$t\t$(mibps "$t")"
            for nb in 0 1; do
                [[ $layout == raw && $nb == 1 ]] && continue
                sync
                start "$impl" "w$impl$r$layout$nb" "$layout" on "$nb"
                t=$(timed nbdcopy "$dir/data.raw" "nbd+unix:///d0?socket=$sock")
                # The next runs start without it (a persistent bitmap would otherwise be loaded and kept enabled).
                ((nb > 0)) && qmp_call "$qmpsock" block-dirty-bitmap-remove '{"node": "d0", "name": "b0"}'
                stop
                echo -e "write ${SIZE_MIB} MiB (nbdcopy raw -> export, $nb bitmaps)\t$layout\t$impl\t$r\t$t\t$(mibps "$t")"
            done
        done
    done
done
# The raw file is still the disk after all of it.
qemu-img compare -q -f raw -F qcow2 "$dir/disk.raw" "$dir/disk.qcow2" && echo "raw file = disk: yes"
