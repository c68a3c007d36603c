#!/usr/bin/env bash
# `strata backup run --domain` side by side with virtnbdbackup (Debian's 1.9.15) on libvirt domains: two paused TCG
# domains with identical fully written qcow2 disks (one per tool, so that neither sees the other's checkpoints).
#  - full backup, then 1 % of the 64 KiB clusters rewritten through HMP qemu-io (every 100th cluster, the same
#    ones on both), then the incremental; wall clock of each whole command
#  - repository / output folder size after the full + incremental (du)
#  - restore of the incremental point to qcow2: `strata backup restore --domain -O qcow2` against `virtnbdrestore`;
#    each restored disk is checked against the live disk with qemu-img compare
# Usage: bench/libvirt.sh [SIZE_MIB] [RUNS]   (needs libvirtd: tests/scripts/libvirt-setup.sh; virtnbdbackup)
#        STRATA_NATIVE=path uses that native strata instead of `dotnet strata.dll`
set -euo pipefail
SIZE_MIB=${1:-4096}
RUNS=${2:-1}
source "$(dirname "$0")/common.sh" lvbench
STRATA=${STRATA_NATIVE:-dotnet $STRATA_DLL}
export LIBVIRT_DEFAULT_URI=qemu:///system
command -v virtnbdbackup >/dev/null || { echo "virtnbdbackup is not installed: tests/scripts/libvirt-setup.sh"; exit 1; }
virsh version >/dev/null
bytes=$((SIZE_MIB * 1048576))
clusters=$((bytes / 65536))

domains=()
cleanup_domains() { for d in "${domains[@]:-}"; do [[ -n $d ]] || continue; virsh destroy "$d" >/dev/null 2>&1 || true; virsh undefine "$d" --checkpoints-metadata >/dev/null 2>&1 || true; done; cleanup; }
trap cleanup_domains EXIT

now() { date +%s.%N; }
secs() { printf "%.2f" "$(echo "$2 - $1" | bc)"; }

define() { # NAME DISK
    cat > "$dir/$1.xml" <<XML
<domain type='qemu'><name>$1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$2'/><target dev='vda' bus='virtio'/></disk>
<serial type='null'/><video><model type='none'/></video><memballoon model='none'/></devices></domain>
XML
    virsh define "$dir/$1.xml" >/dev/null
    domains+=("$1")
    virsh start "$1" --paused >/dev/null
}

dirty() { # NAME: every 100th cluster rewritten, through one virsh session
    local q=/machine/peripheral/virtio-disk0/virtio-backend
    for ((c = 0; c < clusters; c += 100)); do
        echo "qemu-monitor-command $1 --hmp 'qemu-io -d $q \"write -q -P 0x6b $((c * 65536)) 64k\"'"
    done
    echo "qemu-monitor-command $1 --hmp 'qemu-io -d $q \"flush\"'"
} 

echo "| run | tool | full | 1 % incremental | repository | restore |"
echo "|---|---|---:|---:|---:|---:|"
for ((run = 1; run <= RUNS; run++)); do
    qemu-img create -q -f qcow2 "$dir/base.qcow2" "$bytes"
    args=(); for ((off = 0; off < bytes; off += 268435456)); do
        n=$((bytes - off < 268435456 ? bytes - off : 268435456)); args+=(-c "write -q -P 0x5a $off $n"); done
    qemu-io -f qcow2 "${args[@]}" "$dir/base.qcow2"
    for tool in strata virtnbdbackup; do
        name=lvb-$tool-$$-$run
        disk=$dir/$name.qcow2
        cp "$dir/base.qcow2" "$disk"
        define "$name" "$disk"
        out=$dir/out-$tool; rest=$dir/restore-$tool
        sync
        if [[ $tool == strata ]]; then
            $STRATA backup init "$out" >/dev/null
            t0=$(now); $STRATA backup run --domain "$name" "$out" >/dev/null; t1=$(now)
            dirty "$name" | virsh >/dev/null; sync
            t2=$(now); $STRATA backup run --domain "$name" "$out" >/dev/null; t3=$(now)
            t4=$(now); $STRATA backup restore --domain "$name" --to "$rest" -O qcow2 "$out" >/dev/null; t5=$(now)
            restored=$rest/$name-vda.qcow2
        else
            t0=$(now); virtnbdbackup -d "$name" -l full -o "$out" -n >/dev/null 2>&1; t1=$(now)
            dirty "$name" | virsh >/dev/null; sync
            t2=$(now); virtnbdbackup -d "$name" -l inc -o "$out" -n >/dev/null 2>&1; t3=$(now)
            t4=$(now); virtnbdrestore -i "$out" -o "$rest" -n >/dev/null 2>&1; t5=$(now)
            restored=$rest/$(basename "$disk")
        fi
        qemu-img compare -U -q -f qcow2 -F qcow2 "$disk" "$restored" || { echo "$tool: the restore differs from the disk"; exit 1; }
        size=$(du -sb "$out" | cut -f1)
        echo "| $run | $tool | $(secs "$t0" "$t1") s | $(secs "$t2" "$t3") s | $((size / 1048576)) MiB | $(secs "$t4" "$t5") s |"
        virsh destroy "$name" >/dev/null; virsh undefine "$name" --checkpoints-metadata >/dev/null
        rm -rf "$out" "$rest" "$disk"
    done
    rm -f "$dir/base.qcow2"
done
