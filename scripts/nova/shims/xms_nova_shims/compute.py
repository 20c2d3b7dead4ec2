"""nova-compute with nova's in-tree fake.FakeDriver and a compute-node uuid that survives restarts.

FakeDriver names its node uuid with oslo_utils' uuidsentinel (random per process) and writes no
``<state_path>/compute_id``; a restarted nova-compute then refuses to start ("No local node identity
found, but this is not our first startup on this host"). nova.sh keeps one uuid in
``<state_path>/compute_id`` (nova's own node-identity file) and this launcher seeds the sentinel with it.

    python -m xms_nova_shims.compute NODE_NAME NODE_UUID --config-file nova.conf --log-file nova-compute.log
"""
import sys


def main():
    node, node_uuid = sys.argv[1:3]
    from nova.cmd import compute  # first: nova.cmd monkey-patches on import
    from oslo_utils.fixture import uuidsentinel

    uuidsentinel._sentinels["node_" + node] = node_uuid
    sys.argv = ["nova-compute"] + sys.argv[3:]
    sys.exit(compute.main())


if __name__ == "__main__":
    main()
