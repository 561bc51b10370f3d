#!/usr/bin/env bash
# Install the Debian packages vfiod's checks and demo need (run as root).
# QEMU comes from bookworm-backports: QEMU >= 9 emulates igb (SR-IOV) and
# takes brokered iommufd/cdev fds; Debian 12's own QEMU is 7.2. libvirt too
# (11.x; its session daemon and headers, for `vfioctl attach --libvirt` and
# the libvirt-python binding the venv builds).
set -euo pipefail

packages=(linux-image-amd64 dbus libsystemd-dev pkg-config python3-venv python3-dev
          gcc busybox-static kmod udev polkitd)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# (A missing QEMU must not end the script under pipefail: it is what we install.)
qemu_major=$({ qemu-system-x86_64 --version 2>/dev/null || true; } | awk 'NR == 1 { split($4, v, "."); print v[1] }')
libvirt_major=$({ virsh --version 2>/dev/null || true; } | awk -F. 'NR == 1 { print $1 }')
libvirt_packages=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev)
for p in "${libvirt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || libvirt_major=0
done
if [ "${#missing[@]}" -eq 0 ] && [ "${qemu_major:-0}" -ge 9 ] && [ "${libvirt_major:-0}" -ge 11 ]; then
    exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
"$here/apt-backports.sh"
export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ "${qemu_major:-0}" -lt 9 ]; then
    echo "installing QEMU from bookworm-backports"
    apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
fi
if [ "${libvirt_major:-0}" -lt 11 ]; then
    echo "installing libvirt from bookworm-backports"
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${libvirt_packages[@]}"
fi
