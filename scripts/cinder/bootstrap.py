"""Idempotent Cinder fixtures for xms: volume types, a QoS spec, per-type quotas of a test project.

Run by `cinder.sh up` with the cinder venv's python, after cinder-api answers:
  standard-ssd  (volume_backend_name=ssd)
  archive-hdd   (volume_backend_name=hdd), QoS spec xms-archive-qos (consumer back-end) associated
  project 0123456789abcdef0123456789abcdef: gigabytes_standard-ssd=5, gigabytes_archive-hdd=20,
                                            gigabytes=50, volumes=10
"""

from __future__ import annotations

import argparse
import sys
import time

from xms_cinder_conn import DEFAULT_PROJECT, connect_with_session

TYPES = {"standard-ssd": "ssd", "archive-hdd": "hdd"}
QOS_NAME = "xms-archive-qos"
QOS_SPECS = {"total_bytes_sec": "104857600", "total_iops_sec": "500"}  # 100 MiB/s, 500 IOPS
QOS_TYPE = "archive-hdd"
QUOTAS = {"gigabytes_standard-ssd": 5, "gigabytes_archive-hdd": 20, "gigabytes": 50, "volumes": 10}
HOST = "xms-cinder"


def wait_for_pools(bs, backends: list[str], timeout: float = 120.0) -> None:
    """The scheduler knows a backend only after its first capability report: wait for all."""
    want = {f"{HOST}@{b}" for b in backends}
    deadline = time.monotonic() + timeout
    while True:
        seen = {p.name.split("#")[0] for p in bs.backend_pools()}
        if want <= seen:
            return
        if time.monotonic() > deadline:
            sys.exit(f"bootstrap: scheduler still lacks pools {sorted(want - seen)} after {timeout:.0f} s")
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default="http://127.0.0.1:8776")
    ap.add_argument("--project", default=DEFAULT_PROJECT)
    args = ap.parse_args()

    conn = connect_with_session(args.endpoint, args.project)
    bs = conn.block_storage
    wait_for_pools(bs, sorted(set(TYPES.values())))

    types = {}
    for name, backend in TYPES.items():
        vt = bs.find_type(name)
        if vt is None:
            vt = bs.create_type(name=name, extra_specs={"volume_backend_name": backend})
            print(f"bootstrap: created volume type {name} -> {backend} ({vt.id})")
        elif (vt.extra_specs or {}).get("volume_backend_name") != backend:
            bs.update_type_extra_specs(vt, volume_backend_name=backend)
            print(f"bootstrap: set {name} volume_backend_name={backend}")
        types[name] = vt

    qos = bs.find_qos_spec(QOS_NAME)
    if qos is None:
        qos = bs.create_qos_spec(name=QOS_NAME, consumer="back-end", **QOS_SPECS)
        print(f"bootstrap: created QoS spec {QOS_NAME} {QOS_SPECS} ({qos.id})")
    assoc = {a["id"] for a in bs.qos_spec_associations(qos)}
    if types[QOS_TYPE].id not in assoc:
        bs.associate_qos_spec(qos, types[QOS_TYPE].id)
        print(f"bootstrap: associated {QOS_NAME} with {QOS_TYPE}")

    current = bs.get_quota_set(args.project).to_dict()
    if any(current.get(k) != v for k, v in QUOTAS.items()):
        bs.update_quota_set(args.project, **QUOTAS)
        print(f"bootstrap: quotas of project {args.project}: {QUOTAS}")


if __name__ == "__main__":
    main()
