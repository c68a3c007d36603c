#!/usr/bin/env bash
# Brings up libvirtd (the monolithic daemon) with the QEMU driver for the libvirt backup tests, on a Debian machine
# with or without systemd. Idempotent: installs only what is missing, starts libvirtd only when it is not running,
# and returns once `virsh version` answers (the first start probes QEMU's capabilities, about 8 s).
# Not libvirt-daemon-system: it pulls in systemd and iptables; the two things it would provide (the libvirt-qemu
# user, qemu.conf) are done here.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
conf_dir=/var/lib/strata-libvirt-tests

# virtnbdbackup is the peer tool bench/libvirt.sh measures against.
if [ ! -x /usr/sbin/libvirtd ] || ! command -v virsh >/dev/null 2>&1 \
   || ! dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 || ! dpkg -s virtnbdbackup >/dev/null 2>&1; then
    echo "== installing libvirt (libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients virtnbdbackup)"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
        libvirt0 virtnbdbackup qemu-system-x86 qemu-utils libnbd-bin >/dev/null
fi
# libvirt looks its compiled-in default user up before it reads qemu.conf: without it the QEMU driver does not load.
getent group libvirt-qemu >/dev/null || $SUDO groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || $SUDO useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
# QEMU runs as root with no sandboxing the container could not provide; its output goes to a file, not virtlogd.
$SUDO mkdir -p /etc/libvirt "$conf_dir"
$SUDO tee /etc/libvirt/qemu.conf >/dev/null <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
$SUDO tee "$conf_dir/libvirtd.conf" >/dev/null <<CONF
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_level = 3
log_outputs = "3:file:$conf_dir/libvirtd.log"
CONF
if [ -f /run/libvirtd.pid ] && $SUDO kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; then
    echo "libvirtd already running (pid $(cat /run/libvirtd.pid))"
else
    $SUDO /usr/sbin/libvirtd -d -f "$conf_dir/libvirtd.conf"
fi
for _ in $(seq 1 600); do
    $SUDO virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.1
done
$SUDO virsh -c qemu:///system version >/dev/null
echo "libvirtd ready (pid $(cat /run/libvirtd.pid))"
