# Sourced by every bench script: goes to the repository root, builds strata in Release unless STRATA_DLL names a
# strata.dll already, and makes the scratch folder $dir (under BENCH_SCRATCH, default /tmp), removed on exit
# together with every process whose pid the script adds to $pids.
# Scripts that also measure the native AOT build call need_native: it publishes one into out/native unless
# STRATA_NATIVE names a native strata already; NO_NATIVE=1 leaves STRATA_NATIVE empty (no native rows).
# Usage: source "$(dirname "$0")/common.sh" NAME
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${STRATA_DLL:-} ]]; then
    dotnet build -c Release -v q -nologo src/Strata.Cli >/dev/null
    STRATA_DLL=$PWD/src/Strata.Cli/bin/Release/net10.0/strata.dll
fi
need_native() {
    if [[ ${NO_NATIVE:-0} == 1 ]]; then STRATA_NATIVE=""; return; fi
    if [[ -z ${STRATA_NATIVE:-} ]]; then
        dotnet publish src/Strata.Cli -c Release -r linux-x64 -p:PublishAot=true -o out/native -v q -nologo >/dev/null
        STRATA_NATIVE=$PWD/out/native/strata
    fi
}
dir=$(mktemp -d "${BENCH_SCRATCH:-/tmp}/$1.XXXX")
pids=()
cleanup() { for p in "${pids[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
