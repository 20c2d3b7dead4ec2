#!/usr/bin/python3
"""Inspect disk images with libguestfs and print one JSON object on stdout.

Runs under Debian's own python3 (the libguestfs bindings exist only as the Debian package
python3-guestfs); activities/guest.py calls it as a subprocess so it can be timed out and killed.

    inspect.py [--format raw] DISK [DISK...]

Output: {"roots": [{"root", "type", "distro", "product_name", "arch", "major", "minor",
"osinfo", "hostname", "mountpoints"}...], "firmware": "bios"|"uefi", "esp": [...],
"partitions": [...], "filesystems": {...}, "launch_s": float, "inspect_s": float}
or {"error": "..."} with exit status 1.

Firmware is decided the way virt-v2v 2.2 decides it (convert/inspect_source.ml,
get_firmware_bootable_device): any GPT partition of type EFI System Partition and no BIOS boot
partition -> "uefi", otherwise "bios".
"""

import argparse
import json
import sys
import time

ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="raw")
    ap.add_argument("disks", nargs="+")
    a = ap.parse_args()

    import guestfs

    t0 = time.monotonic()
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        for d in a.disks:
            g.add_drive_opts(d, format=a.format, readonly=True)
        g.launch()
        t1 = time.monotonic()

        partitions = list(g.list_partitions())
        esp, bios_boot, parttypes = [], False, {}
        for part in partitions:
            dev = g.part_to_dev(part)
            if dev not in parttypes:
                try:
                    parttypes[dev] = g.part_get_parttype(dev)
                except RuntimeError:
                    parttypes[dev] = None
            if parttypes[dev] == "gpt":
                guid = g.part_get_gpt_type(dev, g.part_to_partnum(part)).upper()
                if guid == ESP_GUID:
                    esp.append(part)
                elif guid == BIOS_BOOT_GUID:
                    bios_boot = True
        firmware = "uefi" if esp and not bios_boot else "bios"

        roots = []
        for r in g.inspect_os():
            def get(fn, default=None):
                try:
                    return fn(r)
                except RuntimeError:
                    return default
            roots.append({
                "root": r,
                "type": get(g.inspect_get_type),
                "distro": get(g.inspect_get_distro),
                "product_name": get(g.inspect_get_product_name),
                "arch": get(g.inspect_get_arch),
                "major": get(g.inspect_get_major_version),
                "minor": get(g.inspect_get_minor_version),
                "osinfo": get(g.inspect_get_osinfo),
                "hostname": get(g.inspect_get_hostname),
                "mountpoints": get(g.inspect_get_mountpoints, {}),
            })
        filesystems = g.list_filesystems()
        t2 = time.monotonic()
        g.shutdown()
    except RuntimeError as e:
        print(json.dumps({"error": " ".join(str(e).split())}))
        return 1
    finally:
        g.close()
    print(json.dumps({
        "roots": roots, "firmware": firmware, "esp": esp, "partitions": partitions,
        "partition_tables": parttypes, "filesystems": filesystems,
        "launch_s": round(t1 - t0, 2), "inspect_s": round(t2 - t1, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
