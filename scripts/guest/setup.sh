#!/usr/bin/env bash
# Idempotent set-up of the Debian packages that guest work (build, inspect, convert, boot) needs.
# apt-get update runs only if something is missing. Quiet; on failure prints one clear line.
set -euo pipefail

PKGS=(qemu-system-x86 qemu-utils debootstrap libguestfs-tools virt-v2v linux-image-amd64
      grub-pc-bin fdisk e2fsprogs python3-guestfs)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
log=$(mktemp /tmp/xms-guest-setup.XXXXXX.log)
echo "guest setup: installing Debian packages: ${missing[*]}"
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  echo "guest setup: apt-get failed installing ${missing[*]}: $(grep -E '^(E:|W:)' "$log" | head -1 || tail -1 "$log") (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
# supermin builds the libguestfs appliance from the host kernel: one must be in /boot.
ls /boot/vmlinuz-* >/dev/null 2>&1 || { echo "guest setup: no kernel in /boot after installing linux-image-amd64" >&2; exit 1; }
