#!/usr/bin/env bash
# A differential by comparison against a blind full, after the source lost its bitmap (kill -9 of the daemon):
# a fully written qcow2 served by qemu-storage-daemon, a full backup, 1 % of the 64 KiB clusters rewritten through
# the daemon's NBD export, kill -9, restart, then in turn
#  - `strata backup run --nbd` (auto: a differential by digests: hashes the frozen disk, compares with the digests the
#    last point recorded, writes what differs; the repository is not read)
#  - the same on a repository whose last point has no digests (as one from before them): a differential by read-back,
#    which reads the last point's chain from the repository to compare
#  - `strata backup run --nbd --level full` (what every tool does today: a blind full, which hashes what it copies)
#  - with STRATA_BASE_DLL naming a strata.dll built before digests: the same blind full without them (their cost)
# each on a copy of the repository as it was after the full: wall clock and CPU time of the whole process.
# Usage: bench/differential.sh [SIZE_MIB] [RUNS]    (needs qemu-img, qemu-io, qemu-storage-daemon)
set -euo pipefail
SIZE_MIB=${1:-4096}
RUNS=${2:-3}
source "$(dirname "$0")/common.sh" diff
STRATA="dotnet $STRATA_DLL"
bytes=$((SIZE_MIB * 1048576))
clusters=$((bytes / 65536))
qemu-img create -q -f qcow2 "$dir/vda.qcow2" "$bytes"
args=(); for ((off = 0; off < bytes; off += 268435456)); do
    n=$((bytes - off < 268435456 ? bytes - off : 268435456)); args+=(-c "write -q -P 0x5a $off $n"); done
qemu-io -f qcow2 "${args[@]}" "$dir/vda.qcow2"

start_qsd() {
    rm -f "$dir/q.sock" "$dir/n.sock"
    qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$dir/vda.qcow2" --blockdev driver=qcow2,node-name=vda,file=f \
        --chardev "socket,id=q,path=$dir/q.sock,server=on,wait=off" --monitor chardev=q \
        --nbd-server "addr.type=unix,addr.path=$dir/n.sock" --export type=nbd,id=e,node-name=vda,name=vda,writable=on &
    qsd=$!; pids+=("$qsd")
    for _ in $(seq 100); do [[ -S $dir/q.sock && -S $dir/n.sock ]] && break; sleep 0.05; done
}
start_qsd
$STRATA backup init "$dir/repo" >/dev/null
$STRATA backup run --socket "$dir/q.sock" --disk vda "$dir/repo" >/dev/null
ndirty=$(((clusters + 99) / 100))
wargs=(); for ((i = 0; i < ndirty; i++)); do wargs+=(-c "write -q -P 0x77 $(( (i * 7919 % clusters) * 65536 )) 65536"); done
qemu-io -f raw "${wargs[@]}" "nbd+unix:///vda?socket=$dir/n.sock"
kill -9 "$qsd"; wait "$qsd" 2>/dev/null || true
start_qsd
cp -a "$dir/repo" "$dir/repo.after-full"

forget_digests() { # the repository as a version before digests left it: no digests file, none in the manifest
    python3 - "$dir/repo/vda" <<'PY'
import glob, json, os, sys
for path in glob.glob(os.path.join(sys.argv[1], '*.json')):
    m = json.load(open(path))
    if 'digests' in m:
        os.remove(os.path.join(sys.argv[1], m.pop('digests')['file']))
        json.dump(m, open(path, 'w'), indent=2)
PY
}

run() { # LABEL [--read-back] [--base] ARGS…: one timed run on a fresh copy of the repository
    local label=$1; shift
    local exe=$STRATA
    rm -rf "$dir/repo"; cp -a "$dir/repo.after-full" "$dir/repo"
    if [[ ${1:-} == --read-back ]]; then forget_digests; shift; fi
    if [[ ${1:-} == --base ]]; then exe="dotnet $STRATA_BASE_DLL"; shift; fi
    # Wall clock, and the CPU time (user + system) of the strata process: on a shared machine the CPU time is the
    # steadier figure of what the run costs.
    local TIMEFORMAT='%R %U %S'
    { time $exe backup run --socket "$dir/q.sock" --disk vda --nbd "$dir/n.sock" --json "$@" "$dir/repo" > "$dir/out.json"; } 2> "$dir/time"
    python3 -c "import json,sys; m=json.load(open('$dir/out.json'))[0]; n=m.get('note') or ''; r,u,s=map(float,open('$dir/time').read().split()[-3:]); print(f'$label {r:.2f} s wall, {u+s:.2f} s CPU, level {m[\"level\"]}, copied {m[\"copied-bytes\"]/1048576:.1f} MiB' + (' (read back)' if 'read back' in n else ''))"
    # The run started a new bitmap: the next run must lose it again, as after the crash.
    python3 - "$dir/q.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rw'); f.readline()
def q(c, a=None):
    f.write(json.dumps({'execute': c, **({'arguments': a} if a else {})}) + '\n'); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'event' not in r: return r
q('qmp_capabilities')
for n in q('query-named-block-nodes')['return']:
    if n['node-name'] == 'vda':
        for b in n.get('dirty-bitmaps', []): q('block-dirty-bitmap-remove', {'node': 'vda', 'name': b['name']})
PY
}
echo "disk ${SIZE_MIB} MiB fully written, 1 % of its clusters rewritten, bitmap lost (kill -9 of qemu-storage-daemon)"
echo "digests file of the full: $(stat -c %s "$dir"/repo.after-full/vda/*.digests) bytes"
for ((r = 1; r <= RUNS; r++)); do
    run "differential by digests  "
    run "differential by read-back" --read-back
    run "blind full               " --level full
    if [[ -n ${STRATA_BASE_DLL:-} ]]; then run "blind full, no digests   " --base --level full; fi
done
