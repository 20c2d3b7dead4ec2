"""End-to-end check of the local Cinder through openstacksdk + os-brick (the path xms's adapter will use).

Run by `cinder.sh up` (and `cinder.sh smoke`) with the cinder venv's python, as root:
  1. connect with the clouds.yaml of `cinder.sh env` (and with an explicit keystoneauth session)
  2. volume types with extra specs, the QoS association, quota usage of the test project
  3. a 10 GiB create on standard-ssd is refused with 413 (per-type quota gigabytes_standard-ssd=5)
  4. a 1 GiB volume on standard-ssd lands on the ssd backend (host xms-cinder@ssd#ssd), one on
     archive-hdd on the hdd backend; usage goes up by 1 GiB each
  5. attachment with this host's os-brick connector -> connection_info (driver_volume_type nfs) ->
     os-brick NFS connector connect_volume -> a file path; write 1 MiB + read it back;
     complete (in-use), disconnect, delete the attachment (available); bootable flag; a snapshot
     created and deleted; delete the volumes
  6. usage back to where it was
Prints one line "smoke: OK ..." or exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
logging.basicConfig(level=logging.ERROR)  # os-brick warns about missing iSCSI/NVMe tools: irrelevant for NFS

import openstack  # noqa: E402
import os_brick.privileged  # noqa: E402
from os_brick.initiator import connector as brick_connector  # noqa: E402

from xms_cinder_conn import DEFAULT_PROJECT, connect_from_clouds_yaml, connect_with_session  # noqa: E402

# We run as root: run os-brick's privileged functions in this process instead of starting a
# privsep daemon through "sudo privsep-helper" (there is no sudo here).
os_brick.privileged.default.set_client_mode(False)
os_brick.privileged.brick_privsep_hide_output.set_client_mode(False)

PREFIX = "xms-smoke-"


def check(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"smoke: FAILED: {what}")


def usage_of(bs, project: str, key: str) -> tuple[int, int]:
    """(limit, in_use) of a quota key, from get_quota_set(project, usage=True)."""
    q = bs.get_quota_set(project, usage=True)
    return q.to_dict()[key], q.usage[key]


def cleanup_leftovers(bs) -> None:
    """Remove what an interrupted earlier run left (attachments first: a volume with one can't go)."""
    for v in bs.volumes(details=True):
        if (v.name or "").startswith(PREFIX):
            atts = list(bs.attachments(volume_id=v.id))  # also finds "attaching" (reserved) ones
            for att in atts:
                bs.delete_attachment(att)
            if atts:
                bs.wait_for_status(v, "available", failures=["error"], interval=0.5, wait=60)
            bs.delete_volume(v, force=v.status not in ("available", "error"))
            bs.wait_for_delete(v, interval=0.5, wait=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cloud", default="xms-dev")
    ap.add_argument("--clouds-yaml", default=None)
    ap.add_argument("--project", default=DEFAULT_PROJECT)
    args = ap.parse_args()
    t0 = time.monotonic()

    conn = connect_from_clouds_yaml(args.cloud, args.clouds_yaml)
    bs = conn.block_storage
    project = conn.config.config.get("xms_project_id") or args.project

    # 2. types, QoS, quota
    types = {t.name: dict(t.extra_specs or {}) for t in bs.types()}
    check(types.get("standard-ssd", {}).get("volume_backend_name") == "ssd", f"standard-ssd: {types}")
    check(types.get("archive-hdd", {}).get("volume_backend_name") == "hdd", f"archive-hdd: {types}")
    other = {t.name for t in connect_with_session(project=project).block_storage.types()}
    check(other == set(types), "the explicit-session connection sees the same types")
    qos = bs.find_qos_spec("xms-archive-qos")
    check(qos is not None and qos.consumer == "back-end", "QoS spec xms-archive-qos (back-end)")
    check(any(a.name == "archive-hdd" for a in bs.qos_spec_associations(qos)), "QoS associated with archive-hdd")
    cleanup_leftovers(bs)
    ssd_limit, ssd_used0 = usage_of(bs, project, "gigabytes_standard-ssd")
    hdd_limit, hdd_used0 = usage_of(bs, project, "gigabytes_archive-hdd")
    check((ssd_limit, hdd_limit) == (5, 20), f"per-type quotas 5/20, got {ssd_limit}/{hdd_limit}")

    # 3. over quota -> 413
    try:
        bs.create_volume(name=PREFIX + "too-big", size=ssd_limit + 5, volume_type="standard-ssd")
        check(False, "a volume over the per-type quota was accepted")
    except openstack.exceptions.HttpException as e:
        check(e.status_code == 413 and "gigabytes_standard-ssd" in str(e), f"413 expected, got {e!r}")

    made = []
    try:
        # 4. placement by type
        t = time.monotonic()
        ssd = bs.create_volume(name=PREFIX + uuid.uuid4().hex[:8], size=1, volume_type="standard-ssd")
        made.append(ssd)
        hdd = bs.create_volume(name=PREFIX + uuid.uuid4().hex[:8], size=1, volume_type="archive-hdd")
        made.append(hdd)
        ssd = bs.wait_for_status(ssd, "available", failures=["error"], interval=0.5, wait=120)
        hdd = bs.wait_for_status(hdd, "available", failures=["error"], interval=0.5, wait=120)
        t_create = time.monotonic() - t
        check("@ssd#" in (ssd.host or ""), f"standard-ssd volume on ssd backend, host={ssd.host}")
        check("@hdd#" in (hdd.host or ""), f"archive-hdd volume on hdd backend, host={hdd.host}")
        check(usage_of(bs, project, "gigabytes_standard-ssd")[1] == ssd_used0 + 1, "ssd usage +1 GiB")
        check(usage_of(bs, project, "gigabytes_archive-hdd")[1] == hdd_used0 + 1, "hdd usage +1 GiB")

        # 5. attachment + os-brick
        props = brick_connector.get_connector_properties(
            root_helper=None, my_ip="127.0.0.1", multipath=False, enforce_multipath=False
        )
        att = bs.create_attachment(ssd, connector=props, mode="rw")
        info = att.connection_info  # flat: export, name, format, driver_volume_type, mount_point_base, ...
        check(info.get("driver_volume_type") == "nfs", f"nfs connection, got {info}")
        brick = brick_connector.InitiatorConnector.factory(
            info["driver_volume_type"].upper(), root_helper=None, conn=info
        )
        dev = brick.connect_volume(info)
        path = dev["path"]
        check(os.path.getsize(path) == 1 << 30, f"{path} is 1 GiB")
        payload = os.urandom(1 << 20)
        with open(path, "r+b") as f:
            f.seek(123 << 20)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        with open(path, "rb") as f:
            f.seek(123 << 20)
            check(f.read(len(payload)) == payload, "read back what was written")
        bs.complete_attachment(att)
        check(bs.get_volume(ssd).status == "in-use", "in-use after complete_attachment")
        brick.disconnect_volume(info, dev)
        bs.delete_attachment(att)
        bs.wait_for_status(ssd, "available", failures=["error"], interval=0.5, wait=60)

        # what finalize/snapshot do: bootable flag, a snapshot (NFS driver: a qcow2 overlay) and its delete
        bs.set_volume_bootable_status(ssd, True)
        check(str(bs.get_volume(ssd).is_bootable).lower() == "true", "bootable flag set")
        snap = bs.create_snapshot(volume_id=ssd.id, name=PREFIX + "snap")
        snap = bs.wait_for_status(snap, "available", failures=["error"], interval=0.5, wait=120)
        bs.delete_snapshot(snap)
        bs.wait_for_delete(snap, interval=0.5, wait=120)
    finally:
        for v in made:
            try:
                bs.delete_volume(v)
            except openstack.exceptions.SDKException:
                pass
        for v in made:
            bs.wait_for_delete(v, interval=0.5, wait=60)

    # 6. usage back
    check(usage_of(bs, project, "gigabytes_standard-ssd")[1] == ssd_used0, "ssd usage back after delete")
    check(usage_of(bs, project, "gigabytes_archive-hdd")[1] == hdd_used0, "hdd usage back after delete")
    print(
        f"smoke: OK in {time.monotonic() - t0:.1f} s (types, QoS, quota 413, 2 volumes available in "
        f"{t_create:.1f} s on {ssd.host} / {hdd.host}, NFS attach -> {path} written and read, detached, bootable, snapshot, deleted)"
    )


if __name__ == "__main__":
    main()
