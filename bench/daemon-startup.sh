#!/usr/bin/env bash
# Start-to-greeting time (wall, and the CPU time the process used up to then: on a loaded machine the wall time
# measures the scheduler as much as the daemon), idle RSS and the latency of the first block-dirty-bitmap-add of
# strata daemon — the JIT build (dotnet strata.dll) and the native AOT build — against qemu-storage-daemon,
# alternating, same image.
# Usage: bench/daemon-startup.sh [RUNS]   (needs qemu-img, qemu-storage-daemon, python3; builds Release and
#        publishes native AOT first, see common.sh; NO_NATIVE=1 skips the native build; extra environment for the
#        strata processes can be given in STRATA_ENV, e.g. STRATA_ENV="DOTNET_GCgen0size=0x100000")
set -euo pipefail
RUNS=${1:-5}
source "$(dirname "$0")/common.sh" sdb
need_native
qemu-img create -q -f qcow2 "$dir/d.qcow2" 1G
measure() { # LABEL CMD...
    python3 - "$dir" "$@" <<'PY'
import os, socket, subprocess, sys, time
d, label, cmd = sys.argv[1], sys.argv[2], sys.argv[3].split()
sock = os.path.join(d, "m.sock")
if os.path.exists(sock): os.unlink(sock)
args = cmd + ["--blockdev", "driver=file,node-name=f0,filename=%s/d.qcow2" % d, "--blockdev", "driver=qcow2,node-name=drive0,file=f0",
              "--chardev", "socket,id=m,path=%s,server=on,wait=off" % sock, "--monitor", "chardev=m"]
env = dict(os.environ)
for kv in os.environ.get("STRATA_ENV", "").split():
    if label != "qemu-storage-daemon": k, v = kv.split("=", 1); env[k] = v
t0 = time.monotonic()
p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
while True:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rb"); f.readline(); break
    except OSError:
        time.sleep(0.001)
t = time.monotonic() - t0
cpu = 0
for task in os.listdir("/proc/%d/task" % p.pid):
    try: cpu += int(open("/proc/%d/task/%s/schedstat" % (p.pid, task)).read().split()[0])
    except OSError: pass
s.sendall(b'{"execute":"qmp_capabilities"}'); f.readline()
time.sleep(1.0)
rss = [l for l in open("/proc/%d/status" % p.pid) if l.startswith("VmRSS")][0].split()[1]
t1 = time.monotonic()
s.sendall(b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"drive0","name":"b0"}}'); reply = f.readline()
add = time.monotonic() - t1
assert b'"return"' in reply, reply
s.sendall(b'{"execute":"quit"}'); f.readline(); p.wait(10)
print("%s\t%.4f\t%.4f\t%s\t%.4f" % (label, t, cpu / 1e9, rss, add))
PY
}
impls=("qemu-storage-daemon|qemu-storage-daemon" "strata-jit|dotnet $STRATA_DLL daemon")
[[ -n $STRATA_NATIVE ]] && impls+=("strata-native|$STRATA_NATIVE daemon")
echo -e "impl\tstart_to_greeting_s\tcpu_to_greeting_s\tidle_rss_kib\tfirst_bitmap_add_s" | tee "$dir/rows.tsv"
for ((i = 0; i < RUNS; i++)); do
    for impl in "${impls[@]}"; do measure "${impl%%|*}" "${impl#*|}" | tee -a "$dir/rows.tsv"; done
done
echo
python3 - "$dir/rows.tsv" <<'PY'
import collections, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
by = collections.defaultdict(list)
for r in rows: by[r[0]].append(r[1:])
q = by["qemu-storage-daemon"]
print("medians (min)\tgreeting ms\tCPU to greeting ms\tidle RSS MiB\tfirst bitmap-add ms\tratios to qemu-storage-daemon, same order (median of pairs)")
for impl, runs in by.items():
    med = [statistics.median(float(x[i]) for x in runs) for i in range(4)]
    low = [min(float(x[i]) for x in runs) for i in range(4)]
    ratios = [statistics.median(float(a[i]) / float(b[i]) for a, b in zip(runs, q)) for i in range(4)]
    print("%s\t%.1f (%.1f)\t%.1f (%.1f)\t%.1f (%.1f)\t%.2f (%.2f)\t%s" % (impl, med[0] * 1000, low[0] * 1000, med[1] * 1000, low[1] * 1000,
          med[2] / 1024, low[2] / 1024, med[3] * 1000, low[3] * 1000, " / ".join("%.2f" % r for r in ratios)))
PY
