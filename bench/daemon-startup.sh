#!/usr/bin/env bash
# Start-to-greeting time and idle RSS of strata daemon against qemu-storage-daemon, alternating, same image.
# Usage: bench/daemon-startup.sh [RUNS]   (needs qemu-img, qemu-storage-daemon, python3; builds Release first)
set -euo pipefail
RUNS=${1:-5}
source "$(dirname "$0")/common.sh" sdb
STRATA="dotnet $STRATA_DLL daemon"
qemu-img create -q -f qcow2 "$dir/d.qcow2" 1G
measure() { # LABEL CMD...
    python3 - "$dir" "$@" <<'PY'
import os, socket, subprocess, sys, time
d, label, cmd = sys.argv[1], sys.argv[2], sys.argv[3].split()
sock = os.path.join(d, "m.sock")
if os.path.exists(sock): os.unlink(sock)
args = cmd + ["--blockdev", "driver=file,node-name=f0,filename=%s/d.qcow2" % d, "--blockdev", "driver=qcow2,node-name=drive0,file=f0",
              "--chardev", "socket,id=m,path=%s,server=on,wait=off" % sock, "--monitor", "chardev=m"]
t0 = time.monotonic()
p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rb"); f.readline(); break
    except OSError:
        time.sleep(0.002)
t = time.monotonic() - t0
s.sendall(b'{"execute":"qmp_capabilities"}'); f.readline()
time.sleep(1.0)
rss = [l for l in open("/proc/%d/status" % p.pid) if l.startswith("VmRSS")][0].split()[1]
s.sendall(b'{"execute":"quit"}'); f.readline(); p.wait(10)
print("%s\t%.3f\t%s" % (label, t, rss))
PY
}
echo -e "impl\tstart_to_greeting_s\tidle_rss_kib"
for ((i = 0; i < RUNS; i++)); do
    measure qemu-storage-daemon "qemu-storage-daemon"
    measure strata "$STRATA"
done
