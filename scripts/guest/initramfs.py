#!/usr/bin/python3
"""Work on an initramfs-tools guest's initramfs configuration through libguestfs; prints one
JSON object on stdout ({"error": ...} and exit status 1 on failure).

    initramfs.py [--format raw] --set MODE DISK...    write conf.d/zz-xms-convert.conf: MODULES=MODE
    initramfs.py [--format raw] --clear DISK...       remove that file again
    initramfs.py [--format raw] --rebuild MODE DISK... without virt-v2v: add the virtio block
        modules to /etc/initramfs-tools/modules and run update-initramfs -u -k all with
        MODULES=MODE in force for that run only (the override is removed afterwards)

Why: virt-v2v rebuilds the guest's initramfs inside its appliance. Under software emulation
(TCG) a Debian-default MODULES=most rebuild takes 12+ min there, MODULES=dep or list ~70 s.
A temporary MODULES=dep override during the conversion gives the fast rebuild and leaves the
guest's own policy in place for its next kernel update. Runs under Debian's python3
(python3-guestfs); activities/guest.py calls it as a killable subprocess.
"""

import argparse
import json
import sys
import time

OVERRIDE = "/etc/initramfs-tools/conf.d/zz-xms-convert.conf"
VIRTIO = ["virtio_pci", "virtio_blk", "virtio_scsi"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="raw")
    act = ap.add_mutually_exclusive_group(required=True)
    act.add_argument("--set", metavar="MODE", choices=["dep", "list", "most", "netboot"])
    act.add_argument("--clear", action="store_true")
    act.add_argument("--rebuild", metavar="MODE", choices=["dep", "list", "most"])
    ap.add_argument("disks", nargs="+")
    a = ap.parse_args()

    import guestfs

    t0 = time.monotonic()
    g = guestfs.GuestFS(python_return_dict=True)
    out = {}
    try:
        for d in a.disks:
            g.add_drive_opts(d, format=a.format, readonly=False)
        g.launch()
        roots = g.inspect_os()
        if not roots:
            raise RuntimeError("no operating system found on the disk(s)")
        root = roots[0]
        mps = g.inspect_get_mountpoints(root)
        for mp in sorted(mps, key=len):
            g.mount(mps[mp], mp)
        uses_it = g.is_dir("/etc/initramfs-tools/conf.d") and g.exists("/usr/sbin/update-initramfs")
        out["initramfs_tools"] = uses_it
        if a.clear:
            out["cleared"] = g.exists(OVERRIDE)
            g.rm_f(OVERRIDE)
        elif not uses_it:
            if a.rebuild:
                raise RuntimeError("the guest does not use initramfs-tools (no /usr/sbin/update-initramfs)")
            out["applied"] = False
        elif a.set:
            g.write(OVERRIDE, f"# written by xms for a virt-v2v conversion; removed afterwards\nMODULES={a.set}\n")
            out["applied"] = True
        else:
            have = g.read_file("/etc/initramfs-tools/modules").decode() if g.exists("/etc/initramfs-tools/modules") else ""
            listed = {ln.split()[0] for ln in have.splitlines() if ln.strip() and not ln.lstrip().startswith("#")}
            add = [m for m in VIRTIO if m not in listed]
            if add:
                g.write("/etc/initramfs-tools/modules",
                        have + ("" if not have or have.endswith("\n") else "\n")
                        + "# added by xms for virtio\n" + "".join(m + "\n" for m in add))
            g.write(OVERRIDE, f"MODULES={a.rebuild}\n")
            t1 = time.monotonic()
            try:
                g.command(["/usr/sbin/update-initramfs", "-u", "-k", "all"])
            finally:
                g.rm_f(OVERRIDE)
            out.update(added_modules=add, update_initramfs_s=round(time.monotonic() - t1, 1))
        g.umount_all()
        g.shutdown()
    except RuntimeError as e:
        print(json.dumps({"error": " ".join(str(e).split())[-600:]}))
        return 1
    finally:
        g.close()
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
