# Sourced by every bench script: goes to the repository root, builds strata in Release unless STRATA_DLL names a
# strata.dll already, and makes the scratch folder $dir (under BENCH_SCRATCH, default /tmp), removed on exit
# together with every process whose pid the script adds to $pids.
# Usage: source "$(dirname "$0")/common.sh" NAME
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${STRATA_DLL:-} ]]; then
    dotnet build -c Release -v q -nologo src/Strata.Cli >/dev/null
    STRATA_DLL=$PWD/src/Strata.Cli/bin/Release/net10.0/strata.dll
fi
dir=$(mktemp -d "${BENCH_SCRATCH:-/tmp}/$1.XXXX")
pids=()
cleanup() { for p in "${pids[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
