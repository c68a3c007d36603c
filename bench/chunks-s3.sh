#!/usr/bin/env bash
# A chunk repository on the project's own radosgw (tests/scripts/ceph-start.sh) against the same bytes moved by
# `aws s3 cp` to the same radosgw, in one run, alternating:
#  - upload: `strata backup run --level full` of a disk served by strata daemon into s3://bench/plain (and into
#    s3://bench/enc, encrypted) against `aws s3 cp` of the disk's raw bytes; wall clock of each process
#  - restore: `strata backup restore -O raw` of that point against `aws s3 cp` of the raw object back to a file
#  - size: after the full + 5 incrementals of 1 % of the disk each (64 KiB blocks scattered over the disk, and
#    then the same in one contiguous run), the bucket's bytes per chunk size against a qcow2-chain folder repository
#    of the same backups, and against the data the guest changed
# The disk: SIZE_MIB of which half is random (incompressible), a quarter text-like (compressible), a quarter zeros.
# Usage: bench/chunks-s3.sh [SIZE_MIB] [RUNS]    (needs ceph-mon ceph-osd radosgw, /usr/bin/aws, qemu-img, qemu-io)
#        CHUNK_SIZES="4M 1M 256K 64K" (the size comparison's chunk sizes), SKIP_SPEED=1 (the size comparison only)
set -euo pipefail
SIZE_MIB=${1:-1024}
RUNS=${2:-3}
source "$(dirname "$0")/common.sh" chunks
need_native
STRATA=${STRATA_NATIVE:-dotnet $STRATA_DLL}
bytes=$((SIZE_MIB * 1048576))
quarter=$((bytes / 4))

tests/scripts/ceph-start.sh "$dir/ceph" >/dev/null
trap 'tests/scripts/ceph-stop.sh "$dir/ceph"; cleanup' EXIT
set -a; source "$dir/ceph/s3.env"; set +a   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
AWS=(/usr/bin/aws --endpoint-url "$AWS_ENDPOINT_URL")
"${AWS[@]}" s3 mb s3://bench >/dev/null
"${AWS[@]}" s3 mb s3://raw >/dev/null

# The disk, written through qemu-io into a qcow2 that strata daemon serves.
head -c $((quarter * 2)) /dev/urandom > "$dir/random.bin"
python3 - "$dir/text.bin" "$quarter" <<'PY'
import random, sys
words = [b"backup", b"chunk", b"qcow2", b"bitmap", b"strata", b"disk", b"sector", b"zstd", b"incremental", b"ceph"]
r = random.Random(5); out = bytearray()
while len(out) < int(sys.argv[2]): out += r.choice(words) + b" "
open(sys.argv[1], "wb").write(out[: int(sys.argv[2])])
PY
qemu-img create -q -f qcow2 "$dir/disk.qcow2" "$bytes"
qemu-io -f qcow2 -c "write -q -s $dir/random.bin 0 $((quarter * 2))" -c "write -q -s $dir/text.bin $((quarter * 2)) $quarter" "$dir/disk.qcow2" >/dev/null 2>&1 || {
    # older qemu-io without -s: copy by dd into a raw disk and convert
    cat "$dir/random.bin" "$dir/text.bin" > "$dir/disk.raw"; truncate -s "$bytes" "$dir/disk.raw"
    qemu-img convert -q -f raw -O qcow2 "$dir/disk.raw" "$dir/disk.qcow2"; }
qemu-img convert -q -O raw "$dir/disk.qcow2" "$dir/disk.raw"
rm -f "$dir/random.bin" "$dir/text.bin"
sync

qmp="$dir/qmp"; nbd="$dir/nbd"
$STRATA daemon --blockdev driver=file,node-name=f0,filename="$dir/disk.qcow2" --blockdev driver=qcow2,node-name=vda,file=f0 \
    --chardev socket,id=m,path="$qmp",server=on,wait=off --monitor chardev=m \
    --nbd-server addr.type=unix,addr.path="$nbd" --export type=nbd,id=guest,node-name=vda,name=vda,writable=on >/dev/null 2>&1 &
pids+=($!)
while [[ ! -S $nbd || ! -S $qmp ]]; do sleep 0.05; done

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
mibps() { python3 -c "print('%.0f' % ($bytes / 1048576 / $1))"; }
export STRATA_PASSPHRASE="bench passphrase"

printf "%-28s %10s %10s\n" step seconds MiB/s
speed_runs=$RUNS; [[ -n ${SKIP_SPEED:-} ]] && speed_runs=0   # SKIP_SPEED=1: the sizes only
for ((run = 1; run <= speed_runs; run++)); do
    "${AWS[@]}" s3 rm --recursive s3://bench >/dev/null || true
    $STRATA backup init --chunks s3://bench/plain >/dev/null
    $STRATA backup init --chunks --encrypt s3://bench/enc >/dev/null
    t=$(secs "${AWS[@]}" s3 cp "$dir/disk.raw" s3://raw/disk.raw); printf "%-28s %10.2f %10s\n" "aws s3 cp up" "$t" "$(mibps "$t")"
    t=$(secs $STRATA backup run --socket "$qmp" --nbd "$nbd" --disk vda --level full s3://bench/plain); printf "%-28s %10.2f %10s\n" "strata run full" "$t" "$(mibps "$t")"
    t=$(secs $STRATA backup run --socket "$qmp" --nbd "$nbd" --disk vda --level full s3://bench/enc); printf "%-28s %10.2f %10s\n" "strata run full (enc)" "$t" "$(mibps "$t")"
    t=$(secs "${AWS[@]}" s3 cp s3://raw/disk.raw "$dir/down.raw"); printf "%-28s %10.2f %10s\n" "aws s3 cp down" "$t" "$(mibps "$t")"
    rm -f "$dir/down.raw"
    t=$(secs $STRATA backup restore --disk vda --to "$dir/restored.raw" -O raw s3://bench/plain); printf "%-28s %10.2f %10s\n" "strata restore" "$t" "$(mibps "$t")"
    cmp "$dir/restored.raw" "$dir/disk.raw" || { echo "restore differs"; exit 1; }
    rm -f "$dir/restored.raw"
    t=$(secs $STRATA backup restore --disk vda --to "$dir/restored.raw" -O raw s3://bench/enc); printf "%-28s %10.2f %10s\n" "strata restore (enc)" "$t" "$(mibps "$t")"
    cmp "$dir/restored.raw" "$dir/disk.raw" || { echo "restore differs"; exit 1; }
    rm -f "$dir/restored.raw"
    echo
done

# Size: the same full + 5 incrementals per layout into a chunk repository per chunk size (CHUNK_SIZES) and into a
# qcow2-chain folder; the guest writes go to the one disk, and every repository takes every point.
bucket_bytes() { "${AWS[@]}" s3 ls --recursive --summarize "s3://bench/$1/" | awk '/Total Size/ {print $3}'; }
folder_bytes() { du -sb --apparent-size "$1" | cut -f1; }
mib() { python3 -c "print('%.1f' % ($1 / 1048576))"; }
sizes=(${CHUNK_SIZES:-4M 1M 256K 64K})
$STRATA backup init "$dir/chain" >/dev/null
$STRATA backup run --socket "$qmp" --disk vda --level full "$dir/chain" >/dev/null
line="after the full: chain folder $(mib "$(folder_bytes "$dir/chain")") MiB"
for cs in "${sizes[@]}"; do
    $STRATA backup init --chunks --chunk-size "$cs" "s3://bench/sz-$cs" >/dev/null
    $STRATA backup run --socket "$qmp" --nbd "$nbd" --disk vda --level full "s3://bench/sz-$cs" >/dev/null
    line+=", chunks of $cs $(mib "$(bucket_bytes "sz-$cs")") MiB"
done
echo "disk $SIZE_MIB MiB; $line"
for layout in scattered contiguous; do
    declare -A c0; for cs in "${sizes[@]}"; do c0[$cs]=$(bucket_bytes "sz-$cs"); done; f0=$(folder_bytes "$dir/chain")
    for ((i = 1; i <= 5; i++)); do
        python3 - "$nbd" "$bytes" "$layout" "$i" <<'PY'
import os, random, socket, struct, sys
path, size, layout, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_UNIX); s.connect(path)
def recv(n):
    b = b""
    while len(b) < n: b += s.recv(n - len(b))
    return b
recv(18); s.sendall(struct.pack(">I", 3))                                   # fixed newstyle, no zeroes
name = b"vda"; s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(name) + 6) + struct.pack(">I", len(name)) + name + b"\0\0")
while True:                                                                 # NBD_OPT_GO replies until the ACK
    magic, opt, typ, ln = struct.unpack(">QIII", recv(20)); recv(ln)
    if typ == 1: break
r = random.Random(seed * 7 + (layout == "contiguous")); n = size // 65536 // 100
offs = [r.randrange(size // 65536) * 65536 for _ in range(n)] if layout == "scattered" else [(base + k) * 65536 for base in [r.randrange(size // 65536 - n)] for k in range(n)]
for h, off in enumerate(offs):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, h, off, 65536) + os.urandom(65536)); recv(16)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
PY
        for cs in "${sizes[@]}"; do $STRATA backup run --socket "$qmp" --nbd "$nbd" --disk vda "s3://bench/sz-$cs" >/dev/null; done
        $STRATA backup run --socket "$qmp" --disk vda "$dir/chain" >/dev/null
    done
    line="chain folder +$(mib $(($(folder_bytes "$dir/chain") - f0))) MiB"
    for cs in "${sizes[@]}"; do line+=", chunks of $cs +$(mib $(($(bucket_bytes "sz-$cs") - c0[$cs]))) MiB"; done
    echo "5 incrementals of 1 % ($layout 64 KiB writes, $(mib $((5 * bytes / 100))) MiB written): $line"
done
