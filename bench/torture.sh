#!/usr/bin/env bash
# Torture, long: the torture tests (tests/Strata.Interop.Tests/TortureTests.cs) run with more rounds and more writing
# than in CI, and their figures printed. Every case starts a fresh daemon on a fresh qcow2 and 3 guests: qemu-io over
# NBD, each connection 4 batches of 48 aio_write (4–64 KiB at 4 KiB-aligned offsets, all queued before qemu-io waits)
# ended by aio_flush, then a new connection; the guests own disjoint 1 MiB stripes, so a model knows every block.
#  - backup/qsd, backup/strata: DISK_MIB qcow2; a full push, then ROUNDS incrementals (pull and push alternating,
#    pull through the guests' own NBD server), SECONDS of writing after each, all with the guests writing; one more
#    incremental after they stop; the daemon quits; the newest point is restored and compared with the disk, the disk
#    with the model (qemu-img compare).
#  - export-del/qsd, export-del/strata: 256 MiB; another export of the same node added and deleted (mode=hard, as a
#    pull backup ends) every 100 ms for 2 x SECONDS while the guests write.
#  - mirror/strata: blockdev-mirror to a local qcow2, ready, job-complete, SECONDS of writing on each side of it.
#  - migrate/strata: 256 MiB; strata migrate to a second strata daemon (guests rest 1 s between connections once the
#    copy runs, else it never gets ready), then SECONDS of writing on the destination.
# Printed: per case passed/failed, its duration and first failure lines; then every figure the case recorded (backups
# with level, MiB copied and duration; writes completed, MiB written, connections, failed writes and connections;
# the comparisons). A failed guest write or handshake, a failed backup or a difference fails the case.
# Usage: bench/torture.sh [ROUNDS] [SECONDS] [WRITERS]   (defaults 12 5 3; env: ONLY=part of a test name, e.g.
#        ONLY=IncrementalBackups; DISK_MIB=1024; BENCH_SCRATCH=parent dir for images; needs qemu-img, qemu-io,
#        qemu-storage-daemon, python3)
set -euo pipefail
ROUNDS=${1:-12}
SECONDS_BETWEEN=${2:-5}
WRITERS=${3:-3}
cd "$(dirname "$0")/.."
# The tests start strata.dll from their own output folder: build that, not just the CLI.
dotnet build tests/Strata.Interop.Tests -c Release -v q -nologo >/dev/null
STRATA_DLL=$PWD/tests/Strata.Interop.Tests/bin/Release/net10.0/strata.dll
source "$(dirname "$0")/common.sh" torture

filter="FullyQualifiedName~TortureTests"
[[ -n ${ONLY:-} ]] && filter="$filter&FullyQualifiedName~$ONLY"
echo "# torture: $ROUNDS incrementals under load, ${SECONDS_BETWEEN} s between steps, $WRITERS writers, ${DISK_MIB:-1024} MiB disk" >&2
t0=$(date +%s)
TMPDIR=$dir STRATA_TORTURE_REPORT=$dir/figures.tsv STRATA_TORTURE_ROUNDS=$ROUNDS STRATA_TORTURE_MS_BETWEEN=$((SECONDS_BETWEEN * 1000)) \
STRATA_TORTURE_WRITERS=$WRITERS STRATA_TORTURE_DISK_MIB=${DISK_MIB:-1024} \
    dotnet test tests/Strata.Interop.Tests -c Release --no-build --filter "$filter" \
        --logger "trx;LogFileName=torture.trx" --results-directory "$dir" >"$dir/test.log" 2>&1 || true
echo "# wall time $(( $(date +%s) - t0 )) s" >&2
touch "$dir/figures.tsv"

python3 - "$dir/torture.trx" "$dir/figures.tsv" <<'PY'
import re, sys, xml.etree.ElementTree as ET
trx, figures = sys.argv[1], sys.argv[2]
ns = {"t": "http://microsoft.com/schemas/VisualStudio/TeamTest/2010"}
try:
    results = ET.parse(trx).getroot().findall(".//t:UnitTestResult", ns)
except (OSError, ET.ParseError) as e:
    sys.exit(f"no test results ({e}); see the test log")
print("case\toutcome\tduration")
for r in results:
    name = re.sub(r"^.*TortureTests\.", "", r.get("testName"))
    print(f"{name}\t{r.get('outcome')}\t{r.get('duration')}")
    msg = r.find(".//t:Message", ns)
    if msg is not None and msg.text:
        for line in msg.text.strip().splitlines()[:6]: print(f"    {line[:220]}")
print("\ncase\tfigure\tvalue")
for line in open(figures):
    if line.strip(): print(line.rstrip("\n"))
PY
