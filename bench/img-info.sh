#!/usr/bin/env bash
# Wall and CPU time (user + system, from wait4) of one `strata img info` process — JIT build (dotnet strata.dll) and native AOT — against `qemu-img
# info`, on a 1 GiB qcow2 with a backing file and a persistent bitmap, alternating runs; human and JSON output.
# Usage: bench/img-info.sh [RUNS]   (needs qemu-img, python3; builds Release and publishes native AOT, see common.sh)
set -euo pipefail
RUNS=${1:-20}
source "$(dirname "$0")/common.sh" imginfo
need_native
qemu-img create -q -f qcow2 "$dir/base.qcow2" 1G
qemu-img create -q -f qcow2 -b "$dir/base.qcow2" -F qcow2 "$dir/top.qcow2"
qemu-img bitmap --add "$dir/top.qcow2" b0
python3 - "$dir" "$RUNS" "$STRATA_DLL" "$STRATA_NATIVE" <<'PY'
import collections, os, statistics, subprocess, sys, time
d, runs, dll, native = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
impls = [("qemu-img", ["qemu-img"]), ("strata-jit", ["dotnet", dll, "img"])] + ([("strata-native", [native, "img"])] if native else [])
t = collections.defaultdict(list); c = collections.defaultdict(list)
for r in range(runs):
    for name, cmd in impls[r % len(impls):] + impls[:r % len(impls)]:
        for out in ("human", "json"):
            t0 = time.monotonic()
            p = subprocess.Popen(cmd + ["info", "--output", out, d + "/top.qcow2"], stdout=subprocess.DEVNULL)
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            assert p.returncode == 0, cmd
            t[(name, out)].append(time.monotonic() - t0); c[(name, out)].append(ru.ru_utime + ru.ru_stime)
med = statistics.median
print("impl\toutput\twall median ms (min)\tCPU median ms (min)\tratio to qemu-img wall / CPU (median of pairs)")
for (name, out), v in t.items():
    q, cv, cq = t[("qemu-img", out)], c[(name, out)], c[("qemu-img", out)]
    print("%s\t%s\t%.1f (%.1f)\t%.1f (%.1f)\t%.2f / %.2f" % (name, out, med(v) * 1000, min(v) * 1000, med(cv) * 1000, min(cv) * 1000,
          med(a / b for a, b in zip(v, q)), med(a / max(b, 1e-4) for a, b in zip(cv, cq))))
PY
