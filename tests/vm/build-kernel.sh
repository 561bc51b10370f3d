#!/usr/bin/env bash
# Build the test kernel (no-IOMMU, iommufd and VFIO cdevs built in) from
# Debian's linux-source-6.12 with tests/vm/vfiotest.fragment, and cache it
# where the VM tests look: ${XDG_CACHE_HOME:-~/.cache}/vfiod/kernel/.
# About 20 minutes on 2 cores; a second run finds the cached image and stops.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
project=$(cd "$here/../.." && pwd)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vfiod/kernel"
mkdir -p "$cache"

if compgen -G "$cache/vmlinuz-*-vfiotest" >/dev/null; then
    echo "test kernel already built: $(ls "$cache"/vmlinuz-*-vfiotest)"
    exit 0
fi

step() { printf '\n==> %s\n' "$*"; }

# linux-source-6.12 is in bookworm-backports (and trixie).
"$project/scripts/apt-backports.sh"

step "installing the kernel source and build tools"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -t bookworm-backports linux-source-6.12
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils rsync

src="$cache/src"
tarball=$(ls /usr/src/linux-source-6.12*.tar.xz | sort | tail -n1)
if [ ! -f "$src/Makefile" ]; then
    step "unpacking $(basename "$tarball")"
    rm -rf "$src" && mkdir -p "$src"
    tar -xf "$tarball" -C "$src" --strip-components=1
fi

step "configuring: virtme-ng's minimal config plus tests/vm/vfiotest.fragment"
vng=$(command -v vng || echo "$project/.venv/bin/vng")
items=()
while read -r line; do
    [[ $line == CONFIG_* ]] && items+=(--configitem "$line")
done < "$here/vfiotest.fragment"
(cd "$src" && "$vng" --kconfig "${items[@]}")
(cd "$src" && make -s olddefconfig)
while read -r line; do
    [[ $line == CONFIG_* ]] || continue
    grep -qx "$line" "$src/.config" || { echo "config did not keep $line" >&2; exit 1; }
done < "$here/vfiotest.fragment"

step "building bzImage with $(nproc) jobs (about 20 minutes on 2 cores)"
(cd "$src" && make -s -j"$(nproc)" bzImage)
release=$(cd "$src" && make -s kernelrelease)
cp "$src/arch/x86/boot/bzImage" "$cache/vmlinuz-$release-vfiotest"
cp "$src/.config" "$cache/config-$release-vfiotest"
echo "built $cache/vmlinuz-$release-vfiotest"
