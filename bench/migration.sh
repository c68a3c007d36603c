#!/usr/bin/env bash
# Disk migration: `strata migrate` (mirror + switch-over + bitmap transfer) against the bare mirror, and the cost of
# moving one dirty bitmap of a 1 TiB disk.
#  Part 1 (SIZE_MIB disk, default 4 GiB, fully written qcow2). Per run, three variants in rotating order, each with a
#  fresh source daemon A (file vda-file / qcow2 vda on the shared source image, writable NBD export "vda") and a
#  fresh, empty destination daemon B, both with QMP and an NBD server on unix sockets. Set-up (untimed): bitmaps
#  vda/bp (persistent, granularity 64 KiB) and vda/bt (not persistent, granularity BT_GRAN, default 64 KiB) are added,
#  then 1 % of the 64 KiB clusters (same seeded random set every run) are rewritten with their own contents through
#  A's export by one qemu-io process, so both bitmaps count 1 % and the image stays bit-identical.
#   - migrate:     `strata migrate --from A.qmp --to B.qmp --disk vda --image dst.qcow2 --from-nbd A.nbd --to-nbd B.nbd`,
#                  wall time of the whole process (.NET start included); its log lines are timestamped on arrival.
#   - bare-strata: the same daemons, by hand over one QMP connection each, timed from the first command to
#                  BLOCK_JOB_COMPLETED: B blockdev-add qcow2 vda (on a file dst.qcow2 made by qemu-img create before
#                  the clock starts) + block-export-add; A blockdev-add nbd node -> B's export, blockdev-mirror
#                  sync=full granularity=(min bitmap granularity, <= 64 KiB, as migrate picks it), BLOCK_JOB_READY,
#                  job-complete, BLOCK_JOB_COMPLETED.
#   - bare-qemu:   the same bare mirror with qemu-storage-daemon as both A and B.
#  Checks (WARNING on stderr): qemu-img compare of source and destination after the daemons stop; after migrate,
#  B's bp/bt exist, are consistent and count what A's counted.
#  Part 2 (bitmap transfer of a 1 TiB disk): strata A serves null-co "big" (1 TiB, writable export "big"); bitmaps
#  (granularity 64 KiB) dirtied through the export with NBD WRITE_ZEROES (qemu-io write -z), each frozen
#  (block-dirty-bitmap-disable) before the next one is added:
#   - sparse: 10000 random 64 KiB clusters + 8 ranges of 1 GiB (~0.8 %);  full: every byte (1024 x 1 GiB);
#   - alt: every other 64 KiB cluster of a 4 GiB region (32768 dirty extents).
#  A exports big read-only with all the bitmaps ("bm"); strata B has its own 1 TiB null-co "big". Per run and
#  pattern (rotating order): x-strata-bitmap-import-begin (one bitmap) then x-strata-bitmap-import, the latter timed
#  as a QMP round trip; B's count checked against A's; the bitmap removed on B again. Also "sparse+alt" in one
#  import (two bitmaps, two contexts). Bytes on the wire come from one extra untimed import per pattern through a
#  counting unix-socket proxy; wire extents and a server-side reference from the script's own python NBD client
#  (same 1 GiB block-status requests as Strata's importer) reading the same bitmaps from strata's A and from a
#  qemu-storage-daemon with the same null-co node and the same dirtying.
#  (qemu-storage-daemon's reference has no 'full' bitmap: its null-co has no write-zeroes, 1 TiB would be written.)
# Usage: bench/migration.sh [SIZE_MIB] [RUNS]   (env: BT_GRAN=65536|4096..., PART2=0 to skip part 2, STRATA_DLL=path/to/strata.dll to skip
#        the build, BENCH_SCRATCH=parent dir for images; needs qemu-img, qemu-io, qemu-storage-daemon, python3)
set -euo pipefail
SIZE_MIB=${1:-4096}
RUNS=${2:-3}
BT_GRAN=${BT_GRAN:-65536}
source "$(dirname "$0")/common.sh" migr
S="dotnet $STRATA_DLL"
bytes=$((SIZE_MIB * 1048576))
qemu-img create -q -f qcow2 "$dir/src.qcow2" "$bytes"
args=(); for ((off = 0; off < bytes; off += 268435456)); do args+=(-c "write -q -P 0x5a $off 268435456"); done
qemu-io -f qcow2 "${args[@]}" "$dir/src.qcow2"
sync

export BENCH_DIR="$PWD/bench"   # (the script has cd'd to the repository root)
cat > "$dir/run.py" <<'PY'
import json, os, random, socket, struct, subprocess, sys, threading, time
sys.path.insert(0, os.environ["BENCH_DIR"])
from benchqmp import Qmp

def out(scenario, impl, run, value, unit):
    print(f"{scenario}\t{impl}\t{run}\t{value:.6g}\t{unit}", flush=True)

def warn(msg):
    print(f"WARNING {msg}", file=sys.stderr, flush=True)

def qemu_io(uri, cmds):
    p = subprocess.run(["qemu-io", "-f", "raw", uri], input="\n".join(cmds) + "\n", text=True, capture_output=True)
    bad = [l for l in p.stdout.splitlines() if "error" in l.lower() or "fail" in l.lower()]
    if p.returncode != 0 or bad: raise RuntimeError(f"qemu-io: rc {p.returncode} {bad[:3]} {p.stderr[-300:]}")

CL = 65536

# ---------------------------------------------------------------- part 1
def prep(qmp, nbd, size, bt_gran):
    """Fresh bp/bt on vda, then 1 % of the clusters rewritten (same data) through the export."""
    q = Qmp(qmp)
    for name in q.bitmaps("vda"):  # left in the image by an earlier daemon (bp is persistent)
        q.cmd("block-dirty-bitmap-remove", {"node": "vda", "name": name})
    q.cmd("block-dirty-bitmap-add", {"node": "vda", "name": "bp", "persistent": True, "granularity": 65536})
    q.cmd("block-dirty-bitmap-add", {"node": "vda", "name": "bt", "granularity": bt_gran})
    n = size // CL
    dirty = random.Random(42).sample(range(n), n // 100)
    qemu_io(f"nbd+unix:///vda?socket={nbd}", [f"write -q -P 0x5a {c * CL} {CL}" for c in dirty])
    counts = {k: v["count"] for k, v in q.bitmaps("vda").items()}
    if counts != {"bp": len(dirty) * CL, "bt": len(dirty) * CL}: warn(f"source bitmap counts {counts}")
    q.close()
    return counts

def migrate(strata, aq, bq, an, bn, dst, run, size, bt_gran):
    counts = prep(aq, an, size, bt_gran)
    t0 = time.monotonic()
    p = subprocess.Popen(strata + ["migrate", "--from", aq, "--to", bq, "--disk", "vda", "--image", dst,
                                   "--from-nbd", an, "--to-nbd", bn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks = {}
    for line in p.stdout:
        t = time.monotonic() - t0
        for key in ("destination:", "mirror ready", "switched over", "bitmaps moved"):
            if line.startswith(key): marks[key] = t
    rc = p.wait(); total = time.monotonic() - t0
    if rc != 0: raise RuntimeError(f"strata migrate exited {rc}: {p.stderr.read().strip()}")
    out("migration, whole process (strata migrate)", "strata", run, total, "s")
    out("— start to destination exported (.NET start, QMP, image create, blockdev-add, export)", "strata", run, marks["destination:"], "s")
    out("— start to mirror ready", "strata", run, marks["mirror ready"], "s")
    out("— ready to switched over (import-begin, job-complete)", "strata", run, marks["switched over"] - marks["mirror ready"], "s")
    out("— switched over to bitmaps moved (disable, export, import)", "strata", run, marks["bitmaps moved"] - marks["switched over"], "s")
    out("— bitmaps moved to process exit", "strata", run, total - marks["bitmaps moved"], "s")
    q = Qmp(bq); got = q.bitmaps("vda"); q.close()
    for name, c in counts.items():
        b = got.get(name)
        if b is None or b.get("inconsistent") or b["count"] != c or b.get("busy"):
            warn(f"run {run}: destination bitmap {name}: {b} (source count {c})")

def bare(impl, aq, bq, an, bn, dst, run, size, bt_gran):
    prep(aq, an, size, bt_gran)
    gran = min(65536, bt_gran)
    a, b = Qmp(aq), Qmp(bq)
    t0 = time.monotonic()
    b.cmd("blockdev-add", {"driver": "qcow2", "node-name": "vda", "file": {"driver": "file", "filename": dst}})
    b.cmd("block-export-add", {"type": "nbd", "id": "vda", "node-name": "vda", "name": "vda", "writable": True})
    a.cmd("blockdev-add", {"driver": "nbd", "node-name": "tgt", "export": "vda", "server": {"type": "unix", "path": bn}})
    a.cmd("blockdev-mirror", {"job-id": "m", "device": "vda", "target": "tgt", "sync": "full", "granularity": gran})
    e = a.wait_event(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), "device", "m", 600)
    if e["event"] != "BLOCK_JOB_READY": raise RuntimeError(f"mirror: {e}")
    t1 = time.monotonic()
    a.cmd("job-complete", {"id": "m"})
    e = a.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), "device", "m", 600)
    t2 = time.monotonic()
    if e["event"] != "BLOCK_JOB_COMPLETED" or "error" in e.get("data", {}): raise RuntimeError(f"mirror: {e}")
    out(f"bare mirror, first command to COMPLETED", impl, run, t2 - t0, "s")
    out(f"— first command to READY", impl, run, t1 - t0, "s")
    out(f"— job-complete to COMPLETED", impl, run, t2 - t1, "s")
    a.close(); b.close()

# ---------------------------------------------------------------- part 2
TIB = 1 << 40
GIB = 1 << 30

def patterns():
    rnd = random.Random(7)
    sparse = [f"write -q -z {c * CL} {CL}" for c in rnd.sample(range(TIB // CL), 10000)]
    sparse += [f"write -q -z {k * 128 * GIB + 7 * GIB} {GIB}" for k in range(8)]
    full = [f"write -q -z {k * GIB} {GIB}" for k in range(TIB // GIB)]
    alt = [f"write -q -z {512 * GIB + 2 * i * CL} {CL}" for i in range(4 * GIB // (2 * CL))]
    return {"sparse": sparse, "full": full, "alt": alt}

def dirty_runs(cmds):
    ivs = sorted((int(c.split()[3]), int(c.split()[4])) for c in cmds)
    runs, total, end = 0, 0, -1
    cur_s = cur_e = None
    for s, l in ivs:
        if cur_e is not None and s <= cur_e: cur_e = max(cur_e, s + l)
        else:
            if cur_e is not None: runs += 1; total += cur_e - cur_s
            cur_s, cur_e = s, s + l
    runs += 1; total += cur_e - cur_s
    return runs, total

def make_bitmaps(qmp, nbd, only=None):
    q = Qmp(qmp)
    pats = {k: v for k, v in patterns().items() if only is None or k in only}
    for name, cmds in pats.items():
        q.cmd("block-dirty-bitmap-add", {"node": "big", "name": name, "granularity": CL})
        t = time.monotonic(); qemu_io(f"nbd+unix:///big?socket={nbd}", cmds)
        print(f"# {name}: {len(cmds)} qemu-io writes in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        q.cmd("block-dirty-bitmap-disable", {"node": "big", "name": name})
    counts = {k: v["count"] for k, v in q.bitmaps("big").items()}
    for name, cmds in pats.items():
        runs, total = dirty_runs(cmds)
        if counts[name] != total: warn(f"{qmp}: bitmap {name} counts {counts[name]}, expected {total}")
    q.cmd("block-export-add", {"type": "nbd", "id": "bm", "node-name": "big", "name": "bm", "writable": False,
                               "bitmaps": list(pats)})
    q.close()
    return counts, {name: dirty_runs(cmds)[0] for name, cmds in pats.items()}

class Proxy:
    """Counting unix-socket proxy: one connection at a time is enough here."""
    def __init__(self, listen, target):
        self.listen, self.target, self.c2s, self.s2c = listen, target, 0, 0
        self.ls = socket.socket(socket.AF_UNIX); self.ls.bind(listen); self.ls.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()
    def _accept(self):
        while True:
            c, _ = self.ls.accept(); s = socket.socket(socket.AF_UNIX); s.connect(self.target)
            threading.Thread(target=self._pump, args=(c, s, "c2s"), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, "s2c"), daemon=True).start()
    def _pump(self, a, b, k):
        try:
            while (d := a.recv(1 << 20)):
                setattr(self, k, getattr(self, k) + len(d)); b.sendall(d)
        except OSError: pass
        try: b.shutdown(socket.SHUT_WR)
        except OSError: pass

def nbd_read_bitmap(path, export, context, size, chunk=GIB):
    """Minimal NBD client: fixed newstyle, structured replies, one meta context, block status in 1 GiB requests.
    Returns (seconds, wire extents, dirty runs, bytes received in the transmission phase)."""
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    f = s.makefile("rwb")
    def rd(n):
        b = f.read(n)
        if len(b) != n: raise RuntimeError("NBD: short read")
        return b
    t0 = time.monotonic()
    magic, opt, flags = struct.unpack(">QQH", rd(18))
    f.write(struct.pack(">I", 3)); f.flush()  # FIXED_NEWSTYLE | NO_ZEROES
    def option(o, data):
        f.write(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data); f.flush()
        replies = []
        while True:
            _, ro, rt, rl = struct.unpack(">QIII", rd(20)); body = rd(rl)
            if rt & 0x80000000: raise RuntimeError(f"NBD option {o}: error {rt:#x} {body}")
            replies.append((rt, body))
            if rt == 1: return replies  # ACK
    option(8, b"")  # STRUCTURED_REPLY
    e, c = export.encode(), context.encode()
    ctx = option(10, struct.pack(">I", len(e)) + e + struct.pack(">II", 1, len(c)) + c)  # SET_META_CONTEXT
    ctx_id = struct.unpack(">I", ctx[0][1][:4])[0]
    option(7, struct.pack(">I", len(e)) + e + struct.pack(">H", 0))  # GO
    pos, wire, runs, rx, last_dirty_end = 0, 0, 0, 0, -1
    while pos < size:
        ln = min(chunk, size - pos)
        f.write(struct.pack(">IHHQQI", 0x25609513, 0, 7, 1, pos, ln)); f.flush()
        while True:
            m, fl, ty, ck, pl = struct.unpack(">IHHQI", rd(20)); body = rd(pl); rx += 20 + pl
            if ty == 5:
                cid = struct.unpack(">I", body[:4])[0]
                if cid != ctx_id: raise RuntimeError("NBD: unexpected context")
                p = pos
                for l, fg in struct.iter_unpack(">II", body[4:]):
                    l = min(l, size - p); wire += 1
                    if fg & 1:
                        if p != last_dirty_end: runs += 1
                        last_dirty_end = p + l
                    p += l
                advance = p - pos
            elif ty & 0x8000: raise RuntimeError(f"NBD error reply {body}")
            if fl & 1: break
        pos += advance
    t = time.monotonic() - t0
    f.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0)); f.flush(); s.close()
    return t, wire, runs, rx

def transfer(aq, an, bq, run_count, pxpath):
    counts, runs = make_bitmaps(aq, an)
    for name in counts:
        out(f"1 TiB bitmap '{name}': dirty bytes", "strata", 0, counts[name] / GIB, "GiB")
        out(f"1 TiB bitmap '{name}': dirty extents", "strata", 0, runs[name], "extents")
    b = Qmp(bq)
    px = Proxy(pxpath, an)
    cases = [("sparse",), ("full",), ("alt",), ("sparse", "alt")]
    def one(case, path):
        b.cmd("x-strata-bitmap-import-begin", {"node": "big", "bitmaps": [{"name": n, "granularity": CL} for n in case]})
        t = time.monotonic()
        b.cmd("x-strata-bitmap-import", {"node": "big", "server": {"type": "unix", "path": path}, "export": "bm"})
        t = time.monotonic() - t
        got = b.bitmaps("big")
        for n in case:
            g = got.get(n)
            if g is None or g.get("inconsistent") or g.get("busy") or g["count"] != counts[n]:
                warn(f"import {case}: destination {n} = {g}, source count {counts[n]}")
            b.cmd("block-dirty-bitmap-remove", {"node": "big", "name": n})
        return t
    for r in range(run_count):
        k = r % len(cases)
        for case in cases[k:] + cases[:k]:
            out(f"import of 1 TiB bitmap '{'+'.join(case)}'", "strata", r, one(case, an), "s")
    for case in cases:
        px.c2s = px.s2c = 0
        one(case, pxpath); time.sleep(0.2)
        out(f"import of 1 TiB bitmap '{'+'.join(case)}': bytes source->dest", "strata", 0, px.s2c, "B")
        out(f"import of 1 TiB bitmap '{'+'.join(case)}': bytes dest->source", "strata", 0, px.c2s, "B")
    b.close()

def reference(impl, an, run_count, names):
    for r in range(run_count):
        for name in names:
            t, wire, runs, rx = nbd_read_bitmap(an, "bm", "qemu:dirty-bitmap:" + name, TIB)
            out(f"python NBD client reads '{name}' (1 GiB requests)", impl, r, t, "s")
            if r == 0:
                out(f"python NBD client reads '{name}': wire extents", impl, 0, wire, "extents")
                out(f"python NBD client reads '{name}': reply bytes", impl, 0, rx, "B")

cmd = sys.argv[1]
if cmd == "migrate":
    migrate(sys.argv[2].split("\x1f"), *sys.argv[3:8], int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10]))
elif cmd == "bare":
    bare(*sys.argv[2:8], int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10]))
elif cmd == "transfer":
    transfer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
elif cmd == "bitmaps":
    make_bitmaps(sys.argv[2], sys.argv[3], sys.argv[4].split(","))
elif cmd == "reference":
    reference(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5].split(","))
PY

start() { # IMPL NAME ARGS... -> starts a daemon with QMP NAME.qmp and NBD server NAME.nbd
    local impl=$1 name=$2; shift 2
    local qmp="$dir/$name.qmp" sock="$dir/$name.nbd"
    rm -f "$qmp" "$sock"
    local cmd="$S daemon"; [[ $impl == qemu ]] && cmd=qemu-storage-daemon
    # qemu-storage-daemon wants the NBD server before an --export
    $cmd --chardev socket,id=m,path="$qmp",server=on,wait=off --monitor chardev=m \
         --nbd-server addr.type=unix,addr.path="$sock" "$@" >"$dir/$name.log" 2>&1 &
    pids+=($!)
    while [[ ! -S $sock || ! -S $qmp ]]; do
        kill -0 "${pids[-1]}" 2>/dev/null || { echo "daemon $name died: $(cat "$dir/$name.log")" >&2; exit 1; }
        sleep 0.02
    done
}
stop() { kill "${pids[-1]}" 2>/dev/null || true; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
src_args=(--blockdev driver=file,node-name=vda-file,filename="$dir/src.qcow2" --blockdev driver=qcow2,node-name=vda,file=vda-file
          --export type=nbd,id=guest,node-name=vda,name=vda,writable=on)
null_args=(--blockdev driver=null-co,node-name=big,size=1099511627776)

res="$dir/results.tsv"
echo "# part 1: ${SIZE_MIB} MiB, bt granularity $BT_GRAN, $RUNS runs" >&2
variants=(migrate bare-strata bare-qemu)
for ((r = 0; r < RUNS; r++)); do
    for ((k = 0; k < 3; k++)); do
        v=${variants[(r + k) % 3]}
        impl=strata; [[ $v == bare-qemu ]] && impl=qemu
        start "$impl" "A$r$v" "${src_args[@]}"
        start "$impl" "B$r$v"
        dst="$dir/dst-$r-$v.qcow2"
        sync; sleep 1
        if [[ $v == migrate ]]; then
            python3 "$dir/run.py" migrate "dotnet"$'\x1f'"$STRATA_DLL" "$dir/A$r$v.qmp" "$dir/B$r$v.qmp" "$dir/A$r$v.nbd" "$dir/B$r$v.nbd" "$dst" "$r" "$bytes" "$BT_GRAN" | tee -a "$res"
        else
            qemu-img create -q -f qcow2 "$dst" "$bytes"
            python3 "$dir/run.py" bare "$impl" "$dir/A$r$v.qmp" "$dir/B$r$v.qmp" "$dir/A$r$v.nbd" "$dir/B$r$v.nbd" "$dst" "$r" "$bytes" "$BT_GRAN" | tee -a "$res"
        fi
        stop; stop
        qemu-img compare -q -f qcow2 -F qcow2 "$dir/src.qcow2" "$dst" || echo "WARNING run $r $v: destination differs from the source" >&2
        rm -f "$dst"
    done
done

if [[ ${PART2:-1} == 1 ]]; then
echo "# part 2: 1 TiB bitmaps" >&2
start strata bigA "${null_args[@]}" --export type=nbd,id=g,node-name=big,name=big,writable=on
start strata bigB "${null_args[@]}"
python3 "$dir/run.py" transfer "$dir/bigA.qmp" "$dir/bigA.nbd" "$dir/bigB.qmp" "$RUNS" "$dir/proxy.nbd" | tee -a "$res"
python3 "$dir/run.py" reference strata "$dir/bigA.nbd" "$RUNS" sparse,full,alt | tee -a "$res"
stop; stop
start qemu qbigA "${null_args[@]}" --export type=nbd,id=g,node-name=big,name=big,writable=on
# no 'full' here: QEMU's null-co has no write-zeroes, so 1 TiB of zeroes would really be written (~250 s)
python3 "$dir/run.py" bitmaps "$dir/qbigA.qmp" "$dir/qbigA.nbd" sparse,alt
python3 "$dir/run.py" reference qemu "$dir/qbigA.nbd" "$RUNS" sparse,alt | tee -a "$res"
stop
fi

python3 - "$res" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("#") or not line.strip(): continue
    sc, impl, run, val, unit = line.rstrip("\n").split("\t")
    rows.setdefault((sc, unit), {}).setdefault(impl, []).append(float(val))
print("\nscenario\tunit\t" + "\t".join(["strata-migrate/strata", "qemu"]) + "\t(median, min – max)")
for (sc, unit), by in rows.items():
    cells = []
    for impl in ("strata", "qemu"):
        v = by.get(impl)
        cells.append("" if not v else f"{statistics.median(v):.4g}" + (f" ({min(v):.4g} – {max(v):.4g})" if len(v) > 1 else ""))
    print(f"{sc}\t{unit}\t" + "\t".join(cells))
PY
