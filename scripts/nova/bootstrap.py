"""Idempotent bootstrap of the local Nova/Neutron (run by `nova.sh up`).

Waits until nova-compute's service is up - with a heartbeat newer than the nova-compute process (a
restarted compute is reported "up" from its previous heartbeats before it consumes RPC again; a build
cast to it then is lost when RabbitMQ restarted too) - and its hypervisor (the fake node) is listed,
then creates what is missing: flavor "xms.small" (1 vCPU, 512 MiB, disk 0 - boot from volume) and network "xms-net" with
subnet "xms-subnet" 10.77.0.0/24 (project-owned, vxlan segment; no DHCP agent exists, addresses are only
allocated in the neutron DB).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings

warnings.filterwarnings("ignore")

from xms_nova_conn import connect_from_clouds_yaml  # noqa: E402

FLAVOR = dict(name="xms.small", vcpus=1, ram=512, disk=0)
NET, SUBNET, CIDR = "xms-net", "xms-subnet", "10.77.0.0/24"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clouds-yaml")
    ap.add_argument("--cloud", default="xms-nova")
    ap.add_argument("--host", default="xms-nova")
    ap.add_argument("--wait", type=float, default=120)
    ap.add_argument("--compute-since", type=float, default=0,
                    help="epoch seconds the nova-compute process started; wait for a heartbeat after it")
    a = ap.parse_args()
    conn = connect_from_clouds_yaml(a.cloud, a.clouds_yaml)

    deadline = time.monotonic() + a.wait
    while True:
        svcs = [s for s in conn.compute.services() if s.binary == "nova-compute" and s.host == a.host]
        # (not details=True: nova-api then asks the compute for its uptime over RPC; the fake driver has none)
        hyps = [h for h in conn.compute.hypervisors() if h.name == a.host]
        beat = 0.0
        if svcs and svcs[0].updated_at:   # naive UTC, whole seconds
            beat = datetime.datetime.fromisoformat(svcs[0].updated_at).replace(
                tzinfo=datetime.timezone.utc).timestamp()
        # the first heartbeat comes 5 s after the RPC server started; +2 s excludes a save at start-up
        if svcs and svcs[0].state == "up" and beat >= a.compute_since + 2 and hyps and hyps[0].state == "up":
            break
        if time.monotonic() > deadline:
            sys.exit(f"bootstrap: nova-compute {a.host} not up with a hypervisor after {a.wait} s: {svcs} {hyps}")
        time.sleep(1)

    made = []
    if not conn.compute.find_flavor(FLAVOR["name"], ignore_missing=True):
        conn.compute.create_flavor(**FLAVOR)
        made.append(FLAVOR["name"])
    net = conn.network.find_network(NET)
    if not net:
        net = conn.network.create_network(name=NET)
        made.append(NET)
    if not conn.network.find_subnet(SUBNET):
        conn.network.create_subnet(name=SUBNET, network_id=net.id, ip_version=4, cidr=CIDR, enable_dhcp=False)
        made.append(SUBNET)
    print(f"bootstrap: compute {a.host} up; flavor {FLAVOR['name']}, network {NET} ({net.id}) "
          f"{'created: ' + ', '.join(made) if made else 'already there'}")


if __name__ == "__main__":
    main()
