#!/usr/bin/env bash
# Fleecing (pull through a frozen view), strata daemon against qemu-storage-daemon, same image, alternating runs:
#  - full pull of the fleecing export with nbdcopy into a fresh raw file
#  - incremental pull: nbdinfo --map=qemu:dirty-bitmap:b0, then a python NBD client (simple replies, 16 reads in
#    flight, <= 32 MiB each) reads only the dirty extents and pwrite()s them into a fresh sparse raw file
#  - write latency on the guest export: N sequential 4 KiB writes, each into a different 64 KiB cluster not written
#    before in the run, without fleecing (before the bitmap exists) and with the fleecing job active (each write
#    makes copy-before-write copy its cluster into the temporary overlay first)
# Per run and implementation: fresh copy of a fully written qcow2, fresh daemon started with
#   --blockdev file f0 / qcow2 d0, QMP on a unix socket, NBD server on a unix socket, writable export "guest" of d0;
# one QMP connection (qemu-storage-daemon takes one client at a time) driven by the embedded python.
# Steps: baseline latency -> block-dirty-bitmap-add d0/b0 -> dirty 1 % of the clusters through "guest" (one qemu-io
# -f raw process) -> legacy fleecing: qemu-img create tmp.qcow2, blockdev-add tmp (backing d0), transaction
# [bitmap-disable b0, bitmap-add b1, blockdev-backup sync=none d0 -> tmp], block-export-add "fleece" (read-only,
# bitmaps [d0/b0]) -> latency with fleecing -> full pull -> incremental pull -> checks of the frozen view ->
# block-export-del fleece, block-job-cancel fl, blockdev-del tmp.
# Correctness guards (WARNING lines on stderr): b0's count, the dirty bytes nbdinfo reports, the frozen view holds the
# pre-fleecing data at every latency write and the dirtied data at every dirty cluster, the incremental pull equals it.
# Usage: bench/fleecing.sh [SIZE_MIB] [RUNS]   (env: N_WRITES=2000, STRATA_DLL=path/to/strata.dll to skip the build,
#        BENCH_SCRATCH=parent dir for images; needs qemu-img, qemu-io, qemu-storage-daemon, nbdcopy, nbdinfo, python3)
set -euo pipefail
SIZE_MIB=${1:-4096}
RUNS=${2:-3}
N_WRITES=${N_WRITES:-2000}
source "$(dirname "$0")/common.sh" fleece
STRATA="dotnet $STRATA_DLL daemon"
bytes=$((SIZE_MIB * 1048576))

export BENCH_DIR="$PWD/bench"   # (the script has cd'd to the repository root)
cat > "$dir/run.py" <<'PY'
import json, os, random, socket, struct, subprocess, sys, time
sys.path.insert(0, os.environ["BENCH_DIR"])
from benchqmp import Qmp

d, impl, run, pid, size, nwrites = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
QMP, NBDS = f"{d}/qmp", f"{d}/nbd"
CL, WARM = 65536, 50
FILL, BASE_P, DIRTY_P, CBW_P = 0x5A, 0xA1, 0x37, 0xC3

def out(scenario, value, unit):
    print(f"{scenario}\t{impl}\t{run}\t{value:.6g}\t{unit}", flush=True)

def warn(msg):
    print(f"WARNING [{impl} run {run}] {msg}", file=sys.stderr, flush=True)

def cpu():  # utime + stime of the daemon, seconds
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

class Nbd:  # fixed newstyle, NBD_OPT_GO, simple replies only (no structured replies negotiated)
    def __init__(self, path, name):
        self.s = socket.socket(socket.AF_UNIX); self.s.connect(path)
        hs = self.recv(18)
        assert hs[:16] == b"NBDMAGICIHAVEOPT", hs
        self.s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        n = name.encode()
        data = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
        self.s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
        while True:
            magic, opt, typ, ln = struct.unpack(">QIII", self.recv(20)); body = self.recv(ln)
            if typ == 1: break
            if typ & 0x80000000: raise RuntimeError(f"NBD_OPT_GO {name}: error {typ:#x} {body!r}")
            if typ == 3 and struct.unpack(">H", body[:2])[0] == 0:
                self.size = struct.unpack(">Q", body[2:10])[0]
        self.handle = 0
    def recv(self, n):
        b = bytearray(n); v = memoryview(b); got = 0
        while got < n:
            k = self.s.recv_into(v[got:])
            if not k: raise RuntimeError("NBD connection closed")
            got += k
        return b
    def recv_into(self, v):
        got = 0
        while got < len(v):
            k = self.s.recv_into(v[got:])
            if not k: raise RuntimeError("NBD connection closed")
            got += k
    def send(self, typ, off, ln, data=b""):
        self.handle += 1
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, typ, self.handle, off, ln) + data)
        return self.handle
    def reply(self):
        magic, err, h = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698, hex(magic)
        if err: raise RuntimeError(f"NBD error {err}")
        return h
    def write(self, off, data):
        self.send(1, off, len(data), data); self.reply()
    def close(self):
        try: self.send(2, 0, 0)
        except OSError: pass
        self.s.close()

def latencies(offsets, pattern):
    c = Nbd(NBDS, "d0"); buf = bytes([pattern]) * 4096; lat = []
    for i, off in enumerate(offsets):
        t0 = time.perf_counter(); c.write(off, buf); t1 = time.perf_counter()
        if i >= WARM: lat.append(t1 - t0)
    c.close()
    lat.sort()
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]

# distinct random clusters for: baseline warm-up+writes, 1 % dirty, fleecing warm-up+writes
rng = random.Random(1000 + run)
nclusters = size // CL
ndirty = round(nclusters * 0.01)
pick = rng.sample(range(nclusters), 2 * (WARM + nwrites) + ndirty)
base_cl, dirty_cl, cbw_cl = pick[:WARM + nwrites], sorted(pick[WARM + nwrites:WARM + nwrites + ndirty]), pick[WARM + nwrites + ndirty:]
at = lambda c: c * CL + rng.randrange(16) * 4096  # a 4 KiB-aligned 4 KiB inside the cluster
base_off, cbw_off = [at(c) for c in base_cl], [at(c) for c in cbw_cl]

q = Qmp(QMP)
# 1. write latency, no fleecing, no bitmap
m0, p99 = latencies(base_off, BASE_P)
m = m0
out("guest 4 KiB write latency, no fleecing: median", m * 1e3, "ms")
out("guest 4 KiB write latency, no fleecing: p99", p99 * 1e3, "ms")
# 2. bitmap, dirty 1 % through the guest export
q.cmd("block-dirty-bitmap-add", {"node": "d0", "name": "b0"})
args = ["qemu-io", "-f", "raw"]
for c in dirty_cl: args += ["-c", f"write -q -P {DIRTY_P} {c * CL} 64k"]
t0 = time.perf_counter(); subprocess.run(args + [f"nbd+unix:///d0?socket={NBDS}"], check=True); t1 = time.perf_counter()
out(f"dirty 1 % ({ndirty} x 64 KiB, one qemu-io through the guest export, start included)", ndirty * CL / 1048576 / (t1 - t0), "MiB/s")
count = next(b["count"] for n in q.cmd("query-named-block-nodes", {"flat": True}) if n["node-name"] == "d0"
             for b in n.get("dirty-bitmaps", []) if b["name"] == "b0")
if count != ndirty * CL: warn(f"b0 count {count} != {ndirty * CL}")
# 3. legacy fleecing
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{d}/tmp.qcow2", str(size)], check=True)
c0, t0 = cpu(), time.perf_counter()
q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tmp", "file": {"driver": "file", "filename": f"{d}/tmp.qcow2"}, "backing": "d0"})
q.cmd("transaction", {"actions": [
    {"type": "block-dirty-bitmap-disable", "data": {"node": "d0", "name": "b0"}},
    {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}},
    {"type": "blockdev-backup", "data": {"job-id": "fl", "device": "d0", "target": "tmp", "sync": "none"}}]})
q.cmd("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "tmp", "name": "fleece", "writable": False,
                           "bitmaps": [{"node": "d0", "name": "b0"}]})
out("fleecing set-up (blockdev-add + transaction + block-export-add)", (time.perf_counter() - t0) * 1e3, "ms")
uri = f"nbd+unix:///fleece?socket={NBDS}"
# 4. write latency with copy-before-write active (every measured write hits a cluster not copied yet)
m, p99 = latencies(cbw_off, CBW_P)
out("guest 4 KiB write latency, fleecing active: median", m * 1e3, "ms")
out("guest 4 KiB write latency, fleecing active: p99", p99 * 1e3, "ms")
out("latency added by copy-before-write (median with - median without)", (m - m0) * 1e3, "ms")
# 5a. full pull
full = f"{d}/full.raw"
os.sync(); time.sleep(0.2)
c0, t0 = cpu(), time.perf_counter()
subprocess.run(["nbdcopy", uri, full], check=True)
t1 = time.perf_counter()
out("full pull (nbdcopy fleece -> new raw file): time", t1 - t0, "s")
out("full pull (nbdcopy fleece -> new raw file): throughput", size / 1048576 / (t1 - t0), "MiB/s")
out("full pull: daemon CPU", cpu() - c0, "s")
# 5b. incremental pull: map of b0, then read the dirty extents into a sparse file
inc = f"{d}/inc.raw"
os.sync(); time.sleep(0.2)
t0 = time.perf_counter()
mp = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:b0", uri], check=True, capture_output=True, text=True).stdout
ext = [(int(o), int(l)) for o, l, t, *_ in (ln.split() for ln in mp.splitlines() if ln.strip()) if int(t) & 1]
reqs = [(o + k, min(32 << 20, o + l - (o + k))) for o, l in ext for k in range(0, l, 32 << 20)]
fd = os.open(inc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.ftruncate(fd, size)
c = Nbd(NBDS, "fleece"); inflight = {}; it = iter(reqs); done = 0
def issue():
    r = next(it, None)
    if r: inflight[c.send(0, *r)] = r
for _ in range(16): issue()
while inflight:
    off, ln = inflight.pop(c.reply()); buf = bytearray(ln); c.recv_into(memoryview(buf))
    os.pwrite(fd, buf, off); done += ln; issue()
c.close(); os.close(fd)
t1 = time.perf_counter()
out("incremental pull (map + read dirty extents -> sparse raw): time", t1 - t0, "s")
out("incremental pull (map + read dirty extents -> sparse raw): throughput", done / 1048576 / (t1 - t0), "MiB/s")
if done != ndirty * CL: warn(f"dirty bytes pulled {done} != {ndirty * CL} ({len(ext)} extents)")
# checks of the frozen view
bad = 0
with open(full, "rb") as f, open(inc, "rb") as g:
    for o in base_off[WARM:]:
        f.seek(o); bad += f.read(4096) != bytes([BASE_P]) * 4096
    for o in cbw_off:
        f.seek(o); bad += f.read(4096) != bytes([FILL]) * 4096
    for cl in dirty_cl:
        f.seek(cl * CL); g.seek(cl * CL); a = f.read(CL)
        bad += a != bytes([DIRTY_P]) * CL or g.read(CL) != a
if bad: warn(f"{bad} frozen-view checks failed")
os.unlink(full); os.unlink(inc)
# 6. teardown
t0 = time.perf_counter()
q.cmd("block-export-del", {"id": "fleece"}); q.wait_event({"BLOCK_EXPORT_DELETED"}, "id", "fleece")
q.cmd("block-job-cancel", {"device": "fl"}); q.wait_event({"BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"}, "device", "fl")
q.cmd("blockdev-del", {"node-name": "tmp"})
out("teardown (export-del + job-cancel + blockdev-del)", (time.perf_counter() - t0) * 1e3, "ms")
PY

cat > "$dir/summary.py" <<'PY'
import statistics, sys
from collections import defaultdict
v = defaultdict(dict); order = []
for line in open(sys.argv[1]):
    s, impl, r, x, unit = line.rstrip("\n").split("\t")
    if (s, unit) not in order: order.append((s, unit))
    v[(s, unit)].setdefault(impl, {})[int(r)] = float(x)
print("| scenario | qemu-storage-daemon | strata daemon | ratio strata/qemu (median of pairs, min – max) |")
print("|---|---:|---:|---:|")
fmt = lambda x: f"{x:.3g}" if x < 100 else f"{x:.0f}"
for s, unit in order:
    q, st = v[(s, unit)].get("qemu", {}), v[(s, unit)].get("strata", {})
    cells = [f"{fmt(statistics.median(d.values()))} {unit} ({fmt(min(d.values()))} – {fmt(max(d.values()))})" if d else "—" for d in (q, st)]
    rs = [st[r] / q[r] for r in q if r in st and q[r]]
    ratio = f"{statistics.median(rs):.2f} ({min(rs):.2f} – {max(rs):.2f})" if rs else "—"
    print(f"| {s} | {cells[0]} | {cells[1]} | {ratio} |")
PY

qemu-img create -q -f qcow2 "$dir/src.qcow2" "$bytes"
args=(); for ((off = 0; off < bytes; off += 268435456)); do args+=(-c "write -q -P 0x5a $off 268435456"); done
qemu-io -f qcow2 "${args[@]}" "$dir/src.qcow2"
sync

t_start=$SECONDS
for ((r = 0; r < RUNS; r++)); do
    order=(qemu strata); ((r % 2)) && order=(strata qemu)
    for impl in "${order[@]}"; do
        w="$dir/$impl$r"; mkdir "$w"
        cp "$dir/src.qcow2" "$w/disk.qcow2"; sync
        cmd=$STRATA; [[ $impl == qemu ]] && cmd=qemu-storage-daemon
        $cmd --blockdev driver=file,node-name=f0,filename="$w/disk.qcow2" --blockdev driver=qcow2,node-name=d0,file=f0 \
             --chardev socket,id=m,path="$w/qmp",server=on,wait=off --monitor chardev=m \
             --nbd-server addr.type=unix,addr.path="$w/nbd" \
             --export type=nbd,id=guest,node-name=d0,name=d0,writable=on >"$w/daemon.log" 2>&1 &
        pid=$!; pids+=("$pid")
        while [[ ! -S $w/nbd || ! -S $w/qmp ]]; do kill -0 "$pid" || { cat "$w/daemon.log"; exit 1; }; sleep 0.02; done
        echo "run $((r + 1))/$RUNS $impl" >&2
        python3 "$dir/run.py" "$w" "$impl" "$r" "$pid" "$bytes" "$N_WRITES" | tee -a "$dir/samples.tsv" >&2 ||
            { echo "FAILED: $impl run $r; daemon log:" >&2; tail -20 "$w/daemon.log" >&2; exit 1; }
        kill "$pid"; wait "$pid" 2>/dev/null || true; pids[-1]=""
        rm -rf "$w"
    done
done
echo "total $((SECONDS - t_start)) s for $RUNS runs x 2 daemons (${SIZE_MIB} MiB, ${N_WRITES} latency writes)" >&2
python3 "$dir/summary.py" "$dir/samples.tsv"
