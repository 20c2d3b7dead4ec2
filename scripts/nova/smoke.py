"""End-to-end check of boot-from-volume through openstacksdk (the call xms's OpenStack adapter makes).

Run by `nova.sh up` (and `nova.sh smoke`) with the nova venv's python:
  1. ONE connection (clouds.yaml of `nova.sh env`) for compute, network and block-storage
  2. two 1 GiB Cinder volumes (standard-ssd, archive-hdd); the boot one marked bootable (nova refuses a
     non-bootable boot volume)
  3. conn.compute.create_server(name, flavor_id, networks=[{"uuid": net}], block_device_mapping=[
     {"uuid", "source_type": "volume", "destination_type": "volume", "boot_index": i,
      "delete_on_termination": False}, ...]) -> ACTIVE
  4. both volumes "in-use", each with one attachment whose server_id is the server (real Cinder
     attachments, made by nova-compute), the server's os-extended-volumes:volumes_attached in BDM order,
     the port on xms-net bound to host xms-nova and ACTIVE
  5. delete the server -> both volumes back to "available" with no attachments; delete the volumes
Prints one line "smoke: OK ..." or exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
import warnings

warnings.filterwarnings("ignore")

import openstack  # noqa: E402
from keystoneauth1 import session as ks_session  # noqa: E402
from keystoneauth1 import token_endpoint  # noqa: E402

from xms_nova_conn import connect_from_clouds_yaml, connect_with_session  # noqa: E402

PREFIX = "xms-nova-smoke-"


def check(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"smoke: FAILED: {what}")


def service_block_storage(conn):
    """Cinder as nova sees it (through cinder-proxy, with a service token): the only way to delete an
    attachment whose server is gone (Cinder refuses a plain caller: bug #2004555 check)."""
    token = conn.config.config["auth"]["token"]
    url = conn.config.config["xms_cinder_service_endpoint"]
    sess = ks_session.Session(auth=token_endpoint.Token(endpoint=url, token=token),
                              additional_headers={"X-Auth-Token": token, "X-Service-Token": "smoke:service"})
    return openstack.connection.Connection(session=sess, block_storage_endpoint_override=url,
                                           block_storage_api_version="3").block_storage


def cleanup_leftovers(conn) -> None:
    """What an interrupted earlier run left: servers first (they hold the volumes), then volumes."""
    for s in conn.compute.servers():
        if (s.name or "").startswith(PREFIX):
            conn.compute.delete_server(s)
            conn.compute.wait_for_delete(s, interval=0.5, wait=120)
    bs = conn.block_storage
    for v in bs.volumes(details=True):
        if (v.name or "").startswith(PREFIX):
            for att in bs.attachments(volume_id=v.id):
                service_block_storage(conn).delete_attachment(att)
            if v.status == "in-use":
                v = bs.wait_for_status(bs.get_volume(v.id), "available", failures=["error"], interval=0.5, wait=60)
            bs.delete_volume(v, force=v.status not in ("available", "error"))
            bs.wait_for_delete(v, interval=0.5, wait=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cloud", default="xms-nova")
    ap.add_argument("--clouds-yaml", default=None)
    ap.add_argument("--flavor", default="xms.small")
    ap.add_argument("--network", default="xms-net")
    ap.add_argument("--host", default="xms-nova")
    a = ap.parse_args()
    t0 = time.monotonic()

    conn = connect_from_clouds_yaml(a.cloud, a.clouds_yaml)
    bs = conn.block_storage
    flavor = conn.compute.find_flavor(a.flavor, ignore_missing=False)
    net = conn.network.find_network(a.network, ignore_missing=False)
    # the explicit-session recipe reaches the same three services
    other = connect_with_session(project=conn.config.config["xms_project_id"])
    check(other.compute.find_flavor(a.flavor) is not None and other.network.find_network(a.network) is not None
          and list(other.block_storage.types()), "connect_with_session sees flavor, network and volume types")
    cleanup_leftovers(conn)

    vols, server = [], None
    try:
        t = time.monotonic()
        for vt in ("standard-ssd", "archive-hdd"):
            vols.append(bs.create_volume(name=PREFIX + uuid.uuid4().hex[:8], size=1, volume_type=vt))
        vols = [bs.wait_for_status(v, "available", failures=["error"], interval=0.5, wait=120) for v in vols]
        bs.set_volume_bootable_status(vols[0], True)
        t_vols = time.monotonic() - t

        t = time.monotonic()
        server = conn.compute.create_server(
            name=PREFIX + "vm", flavor_id=flavor.id, networks=[{"uuid": net.id}],
            block_device_mapping=[
                {"uuid": v.id, "source_type": "volume", "destination_type": "volume", "boot_index": i,
                 "delete_on_termination": False}
                for i, v in enumerate(vols)
            ])
        server = conn.compute.wait_for_server(server, status="ACTIVE", failures=["ERROR"], interval=0.5, wait=180)
        t_active = time.monotonic() - t
        check(server.compute_host == a.host, f"server on host {a.host}: {server.compute_host}")

        # volumes in-use, attached to the server by real Cinder attachments
        for v in vols:
            v = bs.get_volume(v.id)
            check(v.status == "in-use", f"volume {v.id} in-use, is {v.status}")
            check([x["server_id"] for x in v.attachments] == [server.id],
                  f"volume {v.id} attached to {server.id}: {v.attachments}")
            atts = list(bs.attachments(volume_id=v.id))
            check(len(atts) == 1 and atts[0].instance == server.id and atts[0].status == "attached",
                  f"attachment record of {v.id}: {[(x.instance, x.status) for x in atts]}")
        attached = [x["id"] for x in (conn.compute.get_server(server.id).attached_volumes or [])]
        check(attached == [v.id for v in vols], f"os-extended-volumes:volumes_attached in BDM order: {attached}")
        ports = list(conn.network.ports(device_id=server.id))
        check(len(ports) == 1 and ports[0].network_id == net.id and ports[0].binding_host_id == a.host
              and ports[0].status == "ACTIVE",
              f"one ACTIVE port on {a.network} bound to {a.host}: "
              f"{[(p.network_id, p.binding_host_id, p.binding_vif_type, p.status) for p in ports]}")

        # delete -> volumes back to available, no attachments left
        t = time.monotonic()
        conn.compute.delete_server(server)
        conn.compute.wait_for_delete(server, interval=0.5, wait=120)
        # (wait_for_status returns at once if the object passed is already in that status: pass fresh ones)
        vols = [bs.wait_for_status(bs.get_volume(v.id), "available", failures=["error"], interval=0.5, wait=60)
                for v in vols]
        t_delete = time.monotonic() - t
        server = None
        for v in vols:
            check(not v.attachments and not list(bs.attachments(volume_id=v.id)), f"{v.id} has no attachments left")
        check(not list(conn.network.ports(device_id=vols[0].id)), "no ports left")
    finally:
        if server is not None:
            try:
                conn.compute.delete_server(server)
                conn.compute.wait_for_delete(server, interval=0.5, wait=120)
            except Exception as e:  # noqa: BLE001
                print(f"smoke: cleanup: {e}", file=sys.stderr)
        for v in vols:
            try:
                v = bs.wait_for_status(bs.get_volume(v.id), "available", failures=["error"], interval=0.5, wait=60)
                bs.delete_volume(v)
                bs.wait_for_delete(v, interval=0.5, wait=60)
            except Exception as e:  # noqa: BLE001
                print(f"smoke: cleanup of {v.id}: {e}", file=sys.stderr)

    print(f"smoke: OK boot-from-volume with 2 volumes: volumes available in {t_vols:.1f} s, "
          f"server ACTIVE in {t_active:.1f} s, delete + volumes available in {t_delete:.1f} s "
          f"(total {time.monotonic() - t0:.1f} s)")


if __name__ == "__main__":
    main()
