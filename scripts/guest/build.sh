#!/usr/bin/env bash
# Build the test guest images, cached in ${XMS_GUEST_DIR:-/var/tmp/xms-guest}:
#   guest.img  raw, 2 GiB virtual (sparse), MBR, one ext4 partition (LABEL=xms-root) at 1 MiB,
#              Debian 12 minbase + kernel + grub-pc (BIOS), systemd; a unit prints
#              "XMS-BOOT-OK <hostname>" on /dev/ttyS0 once booted, then powers off.
#   data.img   raw, 256 MiB virtual, MBR, one ext4 partition (LABEL=xms-data) with a few files, no OS.
# Rebuilt only with --force or when this script (or XMS_GUEST_MODULES) changed (stamp file).
# Prints the two image paths on stdout; progress and timings go to stderr.
#
# Knobs (part of the stamp):
#   XMS_GUEST_MODULES  initramfs-tools MODULES= for the guest (list|dep|most; default list).
#                      "list" = only /etc/initramfs-tools/modules (virtio, scsi, ata, ext4): the
#                      smallest initramfs, and the one virt-v2v-in-place rebuilds fastest on TCG.
#   XMS_GUEST_PRUNE    1 (default) deletes kernel module trees a VM never needs (GPU, sound,
#                      wireless, NIC drivers other than virtio/e1000, ...): smaller image, faster
#                      inspection and initramfs rebuilds.  0 keeps the full Debian kernel.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${XMS_GUEST_DIR:-/var/tmp/xms-guest}
MODULES_MODE=${XMS_GUEST_MODULES:-list}
PRUNE=${XMS_GUEST_PRUNE:-1}
MIRROR=${XMS_GUEST_MIRROR:-http://deb.debian.org/debian}
HOSTNAME_=xms-guest
ROOT_UUID=5eed0000-7e57-4b00-8000-000000000001     # fixed: the image is reproducible to compare
DATA_UUID=5eed0000-7e57-4b00-8000-000000000002
GUEST_SIZE=$((2 << 30))
DATA_SIZE=$((256 << 20))
FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

mkdir -p "$DIR"
exec 9>"$DIR/.build.lock"
flock 9   # one build at a time; a second caller waits and then finds the cache fresh

stamp=$( { cat "$0"; echo "modules=$MODULES_MODE prune=$PRUNE"; } | sha256sum | cut -c1-16)
if [ "$FORCE" = 0 ] && [ -f "$DIR/guest.img" ] && [ -f "$DIR/data.img" ] \
   && [ "$(cat "$DIR/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$DIR/guest.img"; echo "$DIR/data.img"; exit 0
fi

"$HERE/setup.sh"

LOG="$DIR/build.log"
: >"$LOG"
WORK="$DIR/build.tmp"
ROOT="$WORK/root"
t0=$SECONDS
step() { echo "guest build: [$((SECONDS - t0))s] $*" >&2; echo "== $* ($(date +%T))" >>"$LOG"; }
fail() { echo "guest build: failed: $* (log: $LOG)" >&2; exit 1; }
cleanup() {
  for m in proc sys dev/pts dev; do mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"; done
  return 0
}
trap cleanup EXIT
run() { "$@" >>"$LOG" 2>&1 || fail "$* (exit $?): $(grep -E -i 'error|E:|fail' "$LOG" | tail -1)"; }
in_root() { run chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
                DEBIAN_FRONTEND=noninteractive "$@"; }

cleanup; rm -rf "$WORK"; mkdir -p "$WORK" "$DIR/debs"

step "debootstrap bookworm minbase"
run debootstrap --variant=minbase --cache-dir="$DIR/debs" \
  --include=linux-image-amd64,systemd-sysv,udev,kmod,initramfs-tools,zstd,grub-pc,e2fsprogs \
  bookworm "$ROOT" "$MIRROR"

step "configure the guest"
kver=$(ls "$ROOT/lib/modules" | sort -V | tail -1)
[ -n "$kver" ] || fail "no kernel in the debootstrapped root"
echo "$HOSTNAME_" >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$HOSTNAME_" >"$ROOT/etc/hosts"
# UUID, not /dev/vda1 or /dev/sda1: the same image boots from virtio-blk, SCSI or IDE/SATA.
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$ROOT_UUID" >"$ROOT/etc/fstab"
echo "root:xms" | chroot "$ROOT" chpasswd
cat >"$ROOT/etc/default/grub" <<EOF
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="console=ttyS0,115200n8"
GRUB_TERMINAL=console
GRUB_DISABLE_OS_PROBER=true
GRUB_DISABLE_RECOVERY=true
EOF
cat >"$ROOT/etc/systemd/system/xms-boot-marker.service" <<'EOF'
[Unit]
Description=Print the xms boot marker on the serial port and power off
After=local-fs.target sysinit.target
ConditionKernelCommandLine=!xms.nomarker

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "XMS-BOOT-OK $(cat /proc/sys/kernel/hostname)" >/dev/ttyS0'
ExecStartPost=/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable xms-boot-marker.service
in_root systemctl set-default multi-user.target
# Nothing that waits for a network or a timer on a machine that has neither.
for u in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer fstrim.timer man-db.timer systemd-timesyncd.service; do
  in_root systemctl mask "$u"
done
# Drop journald's disk writes on boot (volatile journal): less I/O under TCG.
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$ROOT/etc/systemd/journald.conf.d/xms.conf"

if [ "$PRUNE" = 1 ]; then
  step "prune kernel modules a VM never needs"
  kd="$ROOT/lib/modules/$kver/kernel"
  keep_eth=$(mktemp -d)
  for m in e1000 e1000e; do [ -d "$kd/drivers/net/ethernet/intel/$m" ] && cp -a "$kd/drivers/net/ethernet/intel/$m" "$keep_eth/"; done
  rm -rf "$kd"/sound "$kd"/drivers/{gpu,media,staging,infiniband,isdn,bluetooth,iio,mtd,nfc,hwmon,net/wireless,net/ethernet,net/can,usb/gadget,usb/serial,input/touchscreen,input/joystick,input/tablet,platform/chrome,leds,w1,thunderbolt,fpga,comedi,edac,hid} \
         "$kd"/net/{bluetooth,wireless,mac80211,nfc,can,ieee802154,mac802154} \
         "$kd"/fs/{ocfs2,gfs2,ceph,smb,nfs,nfsd,ubifs,jffs2,orangefs,afs,coda,nilfs2,f2fs,reiserfs,jfs,bcachefs}
  mkdir -p "$kd/drivers/net/ethernet/intel"; cp -a "$keep_eth"/* "$kd/drivers/net/ethernet/intel/" 2>/dev/null || true
  rm -rf "$keep_eth"
  in_root depmod -a "$kver"
fi

step "initramfs (MODULES=$MODULES_MODE)"
cat >"$ROOT/etc/initramfs-tools/modules" <<'EOF'
# Block drivers the guest may boot from: virtio-blk, virtio-scsi, SATA/IDE, plus the root fs.
virtio_pci
virtio_blk
virtio_scsi
sd_mod
ahci
ata_piix
ext4
EOF
printf 'MODULES=%s\n' "$MODULES_MODE" >"$ROOT/etc/initramfs-tools/conf.d/xms.conf"
mount -t proc proc "$ROOT/proc"; mount -t sysfs sys "$ROOT/sys"; mount --bind /dev "$ROOT/dev"
if [ "$MODULES_MODE" = dep ]; then
  # dep mode looks at the running system's root device; in the chroot that is the build host's.
  # Build the first initramfs with the explicit list, keep MODULES=dep for later rebuilds.
  printf 'MODULES=list\n' >"$ROOT/etc/initramfs-tools/conf.d/xms.conf"
  in_root update-initramfs -u -k "$kver"
  printf 'MODULES=dep\n' >"$ROOT/etc/initramfs-tools/conf.d/xms.conf"
else
  in_root update-initramfs -u -k "$kver"
fi
cleanup
echo "initrd: $(du -h "$ROOT/boot/initrd.img-$kver" | cut -f1)" >>"$LOG"

step "grub files in the root"
mkdir -p "$ROOT/boot/grub/i386-pc"
cp "$ROOT"/usr/lib/grub/i386-pc/*.mod "$ROOT"/usr/lib/grub/i386-pc/*.lst "$ROOT/boot/grub/i386-pc/"
printf 'search.fs_uuid %s root\nset prefix=($root)/boot/grub\n' "$ROOT_UUID" >"$WORK/early.cfg"
cp "$WORK/early.cfg" "$ROOT/tmp/early.cfg"
in_root grub-mkimage -O i386-pc -d /usr/lib/grub/i386-pc -c /tmp/early.cfg -p /boot/grub \
  -o /tmp/core.img biosdisk part_msdos ext2 search_fs_uuid
mv "$ROOT/tmp/core.img" "$WORK/core.img"
cat >"$ROOT/boot/grub/grub.cfg" <<EOF
# Written by xms scripts/guest/build.sh (update-grub would write an equivalent one).
set default=0
set timeout=0
insmod part_msdos
insmod ext2
search --no-floppy --fs-uuid --set=root $ROOT_UUID
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class os {
	insmod gzio
	insmod part_msdos
	insmod ext2
	search --no-floppy --fs-uuid --set=root $ROOT_UUID
	linux /boot/vmlinuz-$kver root=UUID=$ROOT_UUID ro console=ttyS0,115200n8 quiet
	initrd /boot/initrd.img-$kver
}
EOF

step "slim the root"
rm -rf "$ROOT"/usr/share/{doc,man,info,locale,lintian,linda}/* "$ROOT"/var/cache/apt/* \
       "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log "$ROOT"/var/cache/debconf/*-old
find "$ROOT/tmp" "$ROOT/var/tmp" -mindepth 1 -delete
echo "root size: $(du -sh "$ROOT" | cut -f1)" >>"$LOG"

step "make guest.img (MBR, ext4 LABEL=xms-root at 1 MiB)"
img="$WORK/guest.img"; part="$WORK/root.ext4"
truncate -s "$GUEST_SIZE" "$img"
printf 'label: dos\nstart=2048, type=83, bootable\n' | run sfdisk -q "$img"
truncate -s $((GUEST_SIZE - (1 << 20))) "$part"
run mkfs.ext4 -q -F -L xms-root -U "$ROOT_UUID" -d "$ROOT" "$part"
run dd if="$part" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
rm -f "$part"

step "grub (BIOS): core.img + boot.img written by hand, grub.cfg by UUID"
# No libguestfs appliance: grub-install inside it sometimes resolves /boot/grub to the wrong
# disk ("embedding is not possible, but this is required for cross-disk install"), and the
# appliance costs ~50 s of TCG. What grub-install does for an MBR disk is small: copy the
# modules, make a core.img that finds the root by UUID, embed it in the gap after the MBR.
dd if="$ROOT/usr/lib/grub/i386-pc/boot.img" of="$img" bs=440 count=1 conv=notrunc status=none
printf '\x90\x90' | dd of="$img" bs=1 seek=$((0x66)) conv=notrunc status=none  # as grub-bios-setup: no floppy drive check
core_kb=$(du -k "$WORK/core.img" | cut -f1)
[ "$core_kb" -lt 1000 ] || fail "core.img ($core_kb KiB) does not fit before the first partition"
dd if="$WORK/core.img" of="$img" bs=512 seek=1 conv=notrunc status=none

step "make data.img (MBR, ext4 LABEL=xms-data, files, no OS)"
dimg="$WORK/data.img"; dpart="$WORK/data.ext4"; dtree="$WORK/data-tree"
mkdir -p "$dtree/projects/alpha" "$dtree/logs"
echo "xms test data disk: no operating system here" >"$dtree/README.txt"
seq 1 20000 >"$dtree/projects/alpha/numbers.txt"
head -c $((4 << 20)) /dev/urandom >"$dtree/projects/alpha/blob.bin"
date -u +%FT%TZ >"$dtree/logs/created"
truncate -s "$DATA_SIZE" "$dimg"
printf 'label: dos\nstart=2048, type=83\n' | run sfdisk -q "$dimg"
truncate -s $((DATA_SIZE - (1 << 20))) "$dpart"
run mkfs.ext4 -q -F -L xms-data -U "$DATA_UUID" -d "$dtree" "$dpart"
run dd if="$dpart" of="$dimg" bs=1M seek=1 conv=notrunc,sparse status=none

mv -f "$img" "$DIR/guest.img"
mv -f "$dimg" "$DIR/data.img"
echo "$stamp" >"$DIR/stamp"
rm -rf "$WORK"
step "done: guest.img $(du -h "$DIR/guest.img" | cut -f1) allocated, data.img $(du -h "$DIR/data.img" | cut -f1) allocated"
echo "$DIR/guest.img"; echo "$DIR/data.img"
