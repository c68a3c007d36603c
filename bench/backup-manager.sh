#!/usr/bin/env bash
# `strata backup run` end to end against the same backup done with QMP by hand, source qemu-storage-daemon
# (and strata daemon), one fully written qcow2, alternating runs:
#  - by hand (python over the QMP socket): qemu-img create, blockdev-add, transaction [block-dirty-bitmap-add +
#    blockdev-backup sync=full | sync=bitmap bitmap-mode=never], wait BLOCK_JOB_COMPLETED, blockdev-del
#    (+ block-dirty-bitmap-remove of the old bitmap for the incremental); timed inside the script, from before
#    qemu-img create to the last reply
#  - strata backup run --mode push, and --mode pull --nbd (the daemon's NBD server), wall clock of the whole
#    process (.NET start-up, planning queries, the backup, the manifest's SHA-256 digests); push-native is the
#    push run by the native AOT build (published first, see common.sh; NO_NATIVE=1 leaves it out)
#  - full, then 1 % of the 64 KiB clusters rewritten through the daemon's NBD export, then the incremental
#  - repository size after a full + 5 incrementals at 1 % each, against 6 full copies
#  - HAND_COPY_RANGE=1 adds hand-cr: the by-hand backup with x-perf.use-copy-range=true, the copy offload strata
#    backup asks of a QEMU of 6.0 or later (QEMU's default is off), paired in the same run
# Usage: bench/backup-manager.sh [SIZE_MIB] [RUNS]    (needs qemu-img, qemu-io, qemu-storage-daemon, python3)
#        NO_STRATA_SOURCE=1 skips the runs against strata daemon; DROP_CACHES=1 drops the page cache before every
#        timed step (off by default: the figures are page-cache figures, like the other benches here)
set -euo pipefail
SIZE_MIB=${1:-4096}
RUNS=${2:-3}
source "$(dirname "$0")/common.sh" bkmb
need_native
STRATA="dotnet $STRATA_DLL"
bytes=$((SIZE_MIB * 1048576))
clusters=$((bytes / 65536))
ndirty=$(((clusters + 99) / 100))
qemu-img create -q -f qcow2 "$dir/src.qcow2" "$bytes"
args=(); for ((off = 0; off < bytes; off += 268435456)); do
    n=$((bytes - off < 268435456 ? bytes - off : 268435456)); args+=(-c "write -q -P 0x5a $off $n"); done
qemu-io -f qcow2 "${args[@]}" "$dir/src.qcow2"
sync

cat > "$dir/qmp.py" <<'PY'
# by hand over QMP: full SOCK TARGET SIZE | inc SOCK TARGET BACKING SIZE OLD NEW | clear SOCK NODE
import json, os, socket, subprocess, sys, time
cmd, sock = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rwb"); f.readline()
events = []
def qmp(execute, **arguments):
    f.write(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "event" in m: events.append(m); continue
        if "error" in m: raise RuntimeError("%s: %s" % (execute, m["error"]))
        return m["return"]
def wait_job(job):
    while True:
        for e in events:
            if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and e["data"]["device"] == job:
                if e["event"] != "BLOCK_JOB_COMPLETED" or "error" in e["data"]: raise RuntimeError(str(e))
                return
        m = json.loads(f.readline())
        if "event" in m: events.append(m)
def backup(target, size, backing, old, new):
    create = ["qemu-img", "create", "-q", "-f", "qcow2"] + (["-b", backing, "-F", "qcow2"] if backing else []) + [target, size]
    subprocess.run(create, check=True)
    qmp("blockdev-add", driver="qcow2", **{"node-name": "tgt", "file": {"driver": "file", "filename": target}})
    job = {"job-id": "job", "device": "d0", "target": "tgt", "sync": "full"}
    if old: job.update({"sync": "bitmap", "bitmap": old, "bitmap-mode": "never"})
    if os.environ.get("XPERF_COPY_RANGE") == "1": job["x-perf"] = {"use-copy-range": True}
    qmp("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": new, "persistent": True}},
        {"type": "blockdev-backup", "data": job}])
    wait_job("job")
    for attempt in range(40):
        try: qmp("blockdev-del", **{"node-name": "tgt"}); break
        except RuntimeError:
            if attempt == 39: raise
            time.sleep(0.05)
    if old: qmp("block-dirty-bitmap-remove", node="d0", name=old)
qmp("qmp_capabilities")
if cmd == "full": backup(sys.argv[3], sys.argv[4], None, None, "b0")
elif cmd == "inc": backup(sys.argv[3], sys.argv[5], sys.argv[4], sys.argv[6], sys.argv[7])
elif cmd == "clear":
    for n in qmp("query-named-block-nodes"):
        if n["node-name"] == sys.argv[3]:
            for b in n.get("dirty-bitmaps", []): qmp("block-dirty-bitmap-remove", node=sys.argv[3], name=b["name"])
if cmd in ("full", "inc"): print("%.3f" % (time.monotonic() - t0))
PY
# (the by-hand timer starts before the QMP connect; python's own start-up is not in it. The same run timed from
# outside, as strata's runs are, is the row hand-process: both sides' process start-up counted)

start() { # IMPL(qemu|strata) NAME -> sets $qmp $nbd
    local cmd=qemu-storage-daemon; [[ $1 == strata ]] && cmd="$STRATA daemon"
    qmp="$dir/$2.qmp"; nbd="$dir/$2.nbd"; rm -f "$qmp" "$nbd"
    $cmd --blockdev driver=file,node-name=f0,filename="$dir/src.qcow2" --blockdev driver=qcow2,node-name=d0,file=f0 \
         --chardev socket,id=m,path="$qmp",server=on,wait=off --monitor chardev=m \
         --nbd-server addr.type=unix,addr.path="$nbd" --export type=nbd,id=e,node-name=d0,name=d0,writable=on >"$dir/$2.log" 2>&1 &
    pids+=($!)
    while [[ ! -S $nbd || ! -S $qmp ]]; do sleep 0.02; done
    python3 "$dir/qmp.py" clear "$qmp" d0   # no bitmap left over from an earlier run
}
stop() { python3 "$dir/qmp.py" clear "$qmp" d0; kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
settle() { sync; if [[ ${DROP_CACHES:-0} == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; fi; }
dirty() { # SEED: rewrite 1 % of the 64 KiB clusters (random, seeded) through the NBD export
    local a=() off pat; pat=$(printf 0x%02x $(($1 % 250 + 1)))
    for off in $(python3 -c "import random; r = random.Random($1); print(' '.join(str(c * 65536) for c in sorted(r.sample(range($clusters), $ndirty))))"); do
        a+=(-c "write -q -P $pat $off 65536"); done
    qemu-io -f raw "${a[@]}" "nbd+unix:///d0?socket=$nbd"
}
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); python3 -c "print('%.3f' % ($t1 - $t0))"; }
row() { echo -e "$1\t$2\t$3\t$4" | tee -a "$dir/rows.tsv"; }
by_hand() { # IMPL(hand|hand-cr) SCENARIO(full|inc1) RUN ARGS...: rows IMPL (the script's own timer) and IMPL-process (timed from outside)
    local impl=$1 scenario=$2 r=$3 t0 t1 t cr=0; shift 3
    [[ $impl == hand-cr ]] && cr=1
    t0=$(date +%s.%N); t=$(XPERF_COPY_RANGE=$cr python3 "$dir/qmp.py" "${scenario%1}" "$qmp" "$@"); t1=$(date +%s.%N)
    row "$scenario" "$impl" "$r" "$t"
    row "$scenario" "$impl-process" "$r" "$(python3 -c "print('%.3f' % ($t1 - $t0))")"
}

# one full + one 1 % incremental per implementation: IMPL(hand|push|pull|push-strata-src) RUN
one() {
    local impl=$1 r=$2 t src=qemu out="$dir/out-$1-$2" STRATA=$STRATA
    [[ $impl == push-strata-src ]] && src=strata
    [[ $impl == push-native ]] && STRATA=$STRATA_NATIVE
    start "$src" "$impl$r"; mkdir -p "$out"
    if [[ $impl == hand* ]]; then
        settle; by_hand "$impl" full "$r" "$out/full.qcow2" "$bytes"
        dirty $((r * 10 + 1))
        settle; by_hand "$impl" inc1 "$r" "$out/inc.qcow2" "$out/full.qcow2" "$bytes" b0 b1
        ((r > 0)) || qemu-img compare -q -U -f qcow2 -F qcow2 "$out/inc.qcow2" "$dir/src.qcow2"   # the baseline is right
    else
        local extra=(); [[ $impl == pull ]] && extra=(--mode pull --nbd "$nbd")
        $STRATA backup init "$out/repo" >/dev/null
        settle; t=$(timed $STRATA backup run --socket "$qmp" --disk d0 --level full "${extra[@]}" --json "$out/repo")
        row full "$impl" "$r" "$t"
        dirty $((r * 10 + 1))
        settle; t=$(timed $STRATA backup run --socket "$qmp" --disk d0 --level inc "${extra[@]}" --json "$out/repo")
        row inc1 "$impl" "$r" "$t"
        # start-up floor of one strata process, for reading the figures above
        row "startup (backup list)" "$impl" "$r" "$(timed $STRATA backup list --json "$out/repo")"
    fi
    stop; rm -rf "$out"
}

impls=(hand push pull); [[ ${HAND_COPY_RANGE:-0} == 1 ]] && impls+=(hand-cr); [[ -n $STRATA_NATIVE ]] && impls+=(push-native); [[ ${NO_STRATA_SOURCE:-0} == 1 ]] || impls+=(push-strata-src)
echo -e "scenario\timpl\trun\tseconds"
for ((r = 0; r < RUNS; r++)); do
    k=$((r % ${#impls[@]})); order=("${impls[@]:k}" "${impls[@]:0:k}")
    for impl in "${order[@]}"; do one "$impl" "$r"; done
done

# repository size: full + 5 incrementals at 1 % each, strata push from qemu-storage-daemon
start qemu size; repo="$dir/size-repo"
$STRATA backup init "$repo" >/dev/null
$STRATA backup run --socket "$qmp" --disk d0 --level full "$repo" >/dev/null
for i in 1 2 3 4 5; do dirty $((100 + i)); $STRATA backup run --socket "$qmp" --disk d0 --level inc "$repo" >/dev/null; done
point() { $STRATA backup list --json "$repo" | python3 -c "import json, sys; p = json.load(sys.stdin); print(p[$1]['file'])"; }
full_file=$repo/d0/$(point 0)
echo
echo "repository after full + 5 x 1 %: $(du -sb "$repo" | cut -f1) bytes (du -sb); full backup file $(du -sb "$full_file" | cut -f1) bytes"
$STRATA backup list "$repo"
python3 - "$(du -sb "$repo" | cut -f1)" "$(du -sb "$full_file" | cut -f1)" "$bytes" <<'PY'
import sys
repo, full, virt = map(int, sys.argv[1:])
print("6 x full file: %d bytes -> repository / that = %.3f" % (6 * full, repo / (6 * full)))
print("6 x virtual size: %d bytes -> repository / that = %.3f" % (6 * virt, repo / (6 * virt)))
PY
echo "verify: $(timed $STRATA backup verify "$repo") s"; $STRATA backup verify "$repo" | tail -1
last=$repo/d0/$(point -1)
qemu-img compare -U -f qcow2 -F qcow2 "$last" "$dir/src.qcow2"
stop

echo
python3 - "$dir/rows.tsv" <<'PY'
import statistics, sys, collections
t = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    s, impl, r, sec = line.rstrip("\n").split("\t"); t[(s, impl)][int(r)] = float(sec)
cr = any(impl == "hand-cr" for _, impl in t)
print("scenario\timpl\tmedian s\tmin\tmax\tratio to by hand (median of pairs)\tratio to by hand as a process" + ("\tratio to hand-cr" if cr else ""))
def ratio(s, impl, runs, base):
    ref = t.get((s, base), {})
    pairs = [runs[r] / ref[r] for r in runs if r in ref and ref[r] > 0]
    # by-hand rows: only hand-cr against hand (each as timed inside the script, and as a process)
    shown = not impl.startswith("hand") or (impl, base) in (("hand-cr", "hand"), ("hand-cr-process", "hand-process"))
    return "%.2f" % statistics.median(pairs) if pairs and shown else "-"
for (s, impl), runs in t.items():
    v = list(runs.values())
    print("%s\t%s\t%.3f\t%.3f\t%.3f\t%s\t%s" % (s, impl, statistics.median(v), min(v), max(v), ratio(s, impl, runs, "hand"), ratio(s, impl, runs, "hand-process"))
          + ("\t" + ratio(s, impl, runs, "hand-cr") if cr else ""))
PY
