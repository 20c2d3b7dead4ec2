"""LaunchInstance against a real Nova, Placement and Neutron (scripts/nova/nova.sh) next to the real
Cinder: the migration's last steps create a server booted from the migrated volumes.

Only the hypervisor is not real: nova-compute runs Nova's in-tree fake virt driver
(``fake.FakeDriver``), because this machine cannot host guests under libvirt (no usable KVM; the
guest tests boot disks in qemu/TCG directly). Everything xms talks to - nova-api, the scheduler and
Placement, nova-conductor's block-device mappings, Neutron's ports, the Cinder attachments Nova
makes - is the real service. The fake driver's console log is fixed text ("... LAST LINE"), which
is what BootTarget reads from Nova's console API here."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import MiB, raw_sha256, start_stack, workflow_show
from tests.test_openstack import sha256_volume, volumes_named
from tests.test_warm import status
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(900)

FLAVOR, NETWORK = "xms.small", "xms-net"


@pytest.fixture(scope="module")
def nova_stack(nova, tmp_path_factory):
    data = tmp_path_factory.mktemp("xms-nova")
    st = start_stack(data, extra_env={
        "XMS_TARGET": "openstack", "OS_CLOUD": nova.cloud, "OS_CLIENT_CONFIG_FILE": str(nova.clouds_yaml),
    })
    yield st
    st.stop_worker()
    st.server.stop()


@pytest.fixture(autouse=True)
def servers_and_volumes_deleted(nova_stack):
    """Each test leaves nothing behind: servers first (Nova detaches their volumes), then volumes."""
    yield
    store = nova_stack.store()
    for s in list(store.conn.compute.servers()):
        store.conn.compute.delete_server(s)
        store.conn.compute.wait_for_delete(s, wait=300)
    for v in store.list_volumes():
        store.delete_volume(v.id)


def admin_connection(project: str):
    """openstacksdk as the noauth "admin" user (flavors are admin-only), endpoints as nova.sh serves them."""
    import openstack
    from keystoneauth1 import session, token_endpoint

    token = f"admin:{project}"
    compute = f"http://127.0.0.1:{os.environ.get('XMS_NOVA_API_PORT', '8774')}/v2.1"
    sess = session.Session(auth=token_endpoint.Token(endpoint=compute, token=token),
                           additional_headers={"X-Auth-Token": token})
    return openstack.connection.Connection(session=sess, compute_endpoint_override=compute)


def flavor(admin, name: str, ram: int):
    """A flavor of exactly this size (Nova's database outlives test runs: an old one is replaced)."""
    old = admin.compute.find_flavor(name, ignore_missing=True)
    if old is not None and old.ram == ram:
        return old
    if old is not None:
        admin.compute.delete_flavor(old)
    return admin.compute.create_flavor(name=name, ram=ram, vcpus=1, disk=0)


def two_data_disks(tmp_path):
    # data well away from sector 0: no boot record, so guest conversion records them as data disks
    d0 = make_disk(tmp_path / "d0.qcow2", 256 * MiB, [(MiB, 24 * MiB), (200 * MiB, 8 * MiB)], fmt="qcow2", seed=61)
    d1 = make_disk(tmp_path / "d1.raw", 128 * MiB, [(4 * MiB, 16 * MiB)], seed=62)
    return d0, d1


def test_cold_migration_launches_a_server_booted_from_its_volumes(nova_stack, nova, tmp_path):
    d0, d1 = two_data_disks(tmp_path)
    name = "nova-cold"
    r = nova_stack.cli("migrate", name, "--disk", str(d0), "--disk", str(d1), "--project", nova.project,
                       "--volume-type", "standard-ssd", "--flavor", FLAVOR, "--network", NETWORK,
                       "--guest-conversion", "off",  # data disks: nothing to convert, but boot-check the server
                       "--boot-marker", "LAST LINE", "--boot-timeout", "120", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["phase"] == "Completed", view
    store = nova_stack.store()
    compute = store.conn.compute
    server = compute.get_server(view["instance_id"])
    assert server.name == name and server.status == "ACTIVE" and server.metadata["xms.migration"] == name
    assert server.flavor["original_name"] == FLAVOR and NETWORK in server.addresses  # a port on the network
    assert not server.image  # boot from volume: no image
    # block-device mappings in disk order: the boot disk is the first device (sda with the fake
    # driver, vda under libvirt), the next one the second
    vids = [d["volume_id"] for d in view["disks"]]
    by_device = sorted((a.device, a.volume_id) for a in compute.volume_attachments(server))
    assert [v for _, v in by_device] == vids and [d[-1] for d, _ in by_device] == ["a", "b"], by_device
    for i, vid in enumerate(vids):
        vol = store.bs.get_volume(vid)
        assert vol.status == "in-use" and [a["server_id"] for a in vol.attachments] == [server.id]
        assert vol.is_bootable == (i == 0) and vol.metadata["xms.boot_index"] == str(i)
        snaps = store.list_snapshots(vid)  # taken before the first boot: the state the migration delivered
        assert [s.id for s in snaps] == [view["disks"][i]["snapshot_id"]] and snaps[0].status == "available"
    assert len(volumes_named(store, name)) == 2
    st = status(nova_stack, name)
    assert st["boot"]["marker_line"] == "LAST LINE"  # read from Nova's console log API
    assert st["guest"]["note"].startswith("skipped")
    # the server goes, the volumes stay (delete_on_termination false) and hold the sources' bytes
    compute.delete_server(server)
    compute.wait_for_delete(server, wait=300)
    for vid, src in zip(vids, (d0, d1)):
        assert store.bs.get_volume(vid).status == "available"
        want, size = raw_sha256(src, tmp_path)
        assert sha256_volume(store, vid, size) == want
    assert nova.secret not in workflow_show(nova_stack, name)


def test_unknown_flavor_or_network_refused_before_any_volume(nova_stack, nova, tmp_path):
    d0, _ = two_data_disks(tmp_path)
    store = nova_stack.store()
    for flag, value, what in (("--flavor", "no-such-flavor", "flavor"), ("--network", "no-such-net", "network")):
        args = {"--flavor": FLAVOR, "--network": NETWORK, flag: value}
        name = f"nova-bad-{what}"
        r = nova_stack.cli("migrate", name, "--disk", str(d0), "--project", nova.project, "--volume-type",
                           "standard-ssd", *[x for kv in args.items() for x in kv])
        line = r.stderr.strip()
        assert r.returncode == 1 and len(line.splitlines()) == 1, line
        assert f"{what} {value!r} does not exist; allowed: " in line, line
        assert (FLAVOR if what == "flavor" else NETWORK) in line.split("allowed: ")[1], line
        assert volumes_named(store, name) == []
    # a flavor over the project's Nova quota (ram 51200 MiB) is refused at admission too
    admin = admin_connection(nova.project)
    flavor(admin, "xms.over-quota", ram=100 * 1024)
    r = nova_stack.cli("migrate", "nova-over-quota", "--disk", str(d0), "--project", nova.project, "--volume-type",
                       "standard-ssd", "--flavor", "xms.over-quota", "--network", NETWORK)
    line = r.stderr.strip()
    assert r.returncode == 1 and len(line.splitlines()) == 1, line
    assert "Nova quota ram: flavor xms.over-quota needs 102400 MiB, limit 51200 MiB, in use 0 MiB" in line, line
    assert volumes_named(store, "nova-over-quota") == []
    r = nova_stack.cli("migrate", "nova-half", "--disk", str(d0), "--project", nova.project, "--volume-type",
                       "standard-ssd", "--flavor", FLAVOR)
    assert r.returncode == 1 and "--flavor and --network go together" in r.stderr, r.stderr


def test_server_that_cannot_launch_fails_clearly_and_keeps_the_volumes(nova_stack, nova, tmp_path):
    """A flavor no compute host can take (it requires a trait no host has): Nova's scheduler puts the
    server in ERROR ("No valid host");
    the migration fails with Nova's fault, the failed server is deleted and the volumes, which hold
    the finished copy, are kept for a relaunch (or `xms cleanup`)."""
    d0, _ = two_data_disks(tmp_path)
    admin = admin_connection(nova.project)  # the test cloud entry's user is not admin
    nowhere = flavor(admin, "xms.nowhere", ram=512)
    admin.compute.create_flavor_extra_specs(nowhere, {"trait:CUSTOM_XMS_NOWHERE": "required"})
    name = "nova-nohost"
    r = nova_stack.cli("migrate", name, "--disk", str(d0), "--project", nova.project, "--volume-type",
                       "standard-ssd", "--no-snapshot", "--flavor", "xms.nowhere", "--network", NETWORK,
                       "--wait", "--json")
    assert r.returncode == 1
    st = status(nova_stack, name)
    assert st["phase"] == "Failed" and st["reason_type"] == "LaunchFailed", st
    assert "went to ERROR" in st["reason"] and "No valid host" in st["reason"], st["reason"]
    store = nova_stack.store()
    assert list(store.conn.compute.servers(name=name)) == []
    kept = volumes_named(store, name)
    assert len(kept) == 1 and kept[0].status == "available"
    r = nova_stack.cli("cleanup", name)
    assert r.returncode == 0, r.stderr
    assert volumes_named(store, name) == []
