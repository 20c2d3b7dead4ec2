"""The OpenStack adapter: Cinder through openstacksdk, the data path through attachments + os-brick.

* Credentials come from clouds.yaml (``OS_CLOUD`` / ``XMS_CLOUD`` names the entry, openstacksdk's
  convention); requests and workflow history carry only that name.
* Volume types, their backend, QoS spec, availability zone and encryption are read from Cinder.
* Quota: ``reserve`` is a pre-check against Cinder's quota set with usage (volumes, gigabytes and the
  per-type keys). Cinder has no reservations a client can hold, so the footprint is taken by
  creating every volume right away (``Reservation.held_by_volumes``); a 413 from Cinder becomes
  ``QuotaExceeded`` with Cinder's own numbers.
* Idempotent creation: a volume is named ``<migration>-disk<i>`` and carries metadata
  ``xms.migration`` / ``xms.disk_index``; a retried create finds the volume it already made.
* Data path: the worker attaches the volume to its own host as Cinder's backup service does
  (attachment with this host's connector, os-brick ``connect_volume``), the copy engine writes the
  path os-brick returns (a raw file for NFS, a block device for iSCSI/RBD/...), then detaches.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from activities.blockstorage.serve import serve_image
from xms import faults
from xms.errors import (ConfigInvalid, InvalidRequest, LaunchFailed, NotFound, QuotaExceeded, TransientIOError,
                        UnknownVolumeType, XmsError)
from xms.models import (GiB, QoS, InstanceRef, QuotaReport, QuotaUsage, Reservation, SnapshotRef,
                        TargetEndpoint, VolumeRef, VolumeTypeInfo)

WAIT_S = 300
META_MIGRATION, META_DISK, META_WRITTEN = "xms.migration", "xms.disk_index", "xms.written"
META_INSTANCE, META_BOOT_INDEX = "xms.instance", "xms.boot_index"
_QUOTA_413 = re.compile(r"Requested (\d+)G, quota is (-?\d+)G and (\d+)G has been consumed")


class AttachFailed(TransientIOError):
    type = "AttachFailed"


def _sdk():
    import openstack  # imported lazily: the local adapter never needs it

    return openstack


class OpenStackBlockStore:
    """One cloud (a clouds.yaml entry). Thread-safe: activities share it."""

    def __init__(self, cloud: str, run_dir: Path | None = None):
        self.cloud = cloud
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._conn = None

    # ------------------------------------------------------------------ connection

    @property
    def conn(self):
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            return self._conn

    def _connect(self):
        openstack = _sdk()
        try:
            conn = openstack.connect(cloud=self.cloud)
        except openstack.exceptions.ConfigException as e:
            raise ConfigInvalid(f"cloud {self.cloud!r}: {_one_line(e)} (clouds.yaml: OS_CLIENT_CONFIG_FILE, "
                                "./clouds.yaml, ~/.config/openstack/clouds.yaml or /etc/openstack/clouds.yaml)") from None
        auth = conn.config.config.get("auth") or {}
        if conn.config.config.get("auth_type") in ("admin_token", "token") and auth.get("token"):
            # token auth: keystoneauth sends version discovery without the plugin's token; a
            # session header puts it on every request
            conn.session.additional_headers["X-Auth-Token"] = auth["token"]
        return conn

    @property
    def bs(self):
        return self.conn.block_storage

    @property
    def project_id(self) -> str:
        """The project this cloud entry acts for (Cinder's v3 endpoint carries it as its last part)."""
        pid = None
        try:
            pid = self.conn.current_project_id
        except Exception:  # token-endpoint auth has no project in its plugin
            pid = None
        if not pid:
            url = self.bs.get_endpoint() or ""
            pid = urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
        return pid

    def _call(self, what: str, fn, *args, service: str = "Cinder", **kwargs):
        """One API call with its failure mapped to an xms error (one line, stable type)."""
        openstack = _sdk()
        try:
            return fn(*args, **kwargs)
        except openstack.exceptions.NotFoundException as e:
            raise NotFound(f"{what}: {_one_line(e)}") from None
        except openstack.exceptions.HttpException as e:
            if e.status_code == 413:
                raise _quota_error(str(e.details or e)) from None
            if e.status_code and 400 <= e.status_code < 500 and e.status_code not in (408, 409, 429):
                raise InvalidRequest(f"{what}: {service} answered {e.status_code}: {_one_line(e)}") from None
            raise TransientIOError(f"{what}: {service} answered {e.status_code}: {_one_line(e)}") from None
        except openstack.exceptions.ResourceFailure as e:
            raise TransientIOError(f"{what}: {_one_line(e)}") from None
        except openstack.exceptions.ResourceTimeout as e:
            raise TransientIOError(f"{what}: {_one_line(e)}") from None
        except openstack.exceptions.SDKException as e:
            raise TransientIOError(f"{what}: {_one_line(e)}") from None

    # ------------------------------------------------------------------ catalogue

    def volume_types(self) -> list[VolumeTypeInfo]:
        bs = self.bs
        types = list(self._call("list volume types", bs.types))
        qos_of: dict[str, dict] = {}
        for q in self._call("list QoS specs", lambda: list(bs.qos_specs())):
            for a in self._call("QoS associations", lambda q=q: list(bs.qos_spec_associations(q))):
                qos_of[a.id] = dict(q.specs or {})
        zones = [z.name for z in self._call("list availability zones", lambda: list(bs.availability_zones()))
                 if (z.state or {}).get("available", True)] or ["nova"]
        out = []
        for t in types:
            specs = dict(t.extra_specs or {})
            qos = qos_of.get(t.id, {})
            allowed = [z.strip() for z in specs.get("RESKEY:availability_zones", "").split(",") if z.strip()]
            out.append(VolumeTypeInfo(
                name=t.name,
                backend=specs.get("volume_backend_name", "(scheduler's choice)"),
                availability_zone=(allowed or zones)[0],
                qos=QoS(write_bytes_sec=_int(qos.get("write_bytes_sec") or qos.get("total_bytes_sec")),
                        write_iops_sec=_int(qos.get("write_iops_sec") or qos.get("total_iops_sec"))),
                encrypted=self._encrypted(t.id),
                description=" ".join(x for x in [t.description or "", f"[QoS {', '.join(f'{k}={v}' for k, v in sorted(qos.items()))}]"
                                                   if qos else ""] if x),
            ))
        return sorted(out, key=lambda t: t.name)

    def _encrypted(self, type_id: str) -> bool:
        openstack = _sdk()
        try:
            enc = self.bs.get_type_encryption(type_id)
        except openstack.exceptions.SDKException:
            return False
        return bool(getattr(enc, "encryption_id", None) or getattr(enc, "provider", None))

    def get_volume_type(self, name: str) -> VolumeTypeInfo:
        types = {t.name: t for t in self.volume_types()}
        if name not in types:
            raise UnknownVolumeType(
                f"unknown volume type {name!r} in cloud {self.cloud}; available: {', '.join(sorted(types)) or 'none'}")
        return types[name]

    # ------------------------------------------------------------------ quota

    def quota(self, project: str) -> QuotaReport:
        q = self._call(f"quota of project {project}", self.bs.get_quota_set, project, usage=True)
        limits = q.to_dict(computed=False)
        usage, reserved = dict(q.usage or {}), dict(q.reservation or {})
        quotas = {}
        for key, lim in limits.items():
            if not re.match(r"^(volumes|gigabytes|snapshots)(_.+)?$", key) or not isinstance(lim, int):
                continue
            quotas[key] = QuotaUsage(limit=lim, in_use=int(usage.get(key, 0) or 0),
                                     reserved=int(reserved.get(key, 0) or 0))
        return QuotaReport(project=project, quotas=quotas)

    def set_quota(self, project: str, limits: dict[str, int]) -> QuotaReport:
        self._call(f"set quota of project {project}", self.bs.update_quota_set, project, **limits)
        return self.quota(project)

    def _check_project(self, project: str) -> None:
        mine = self.project_id
        if project != mine:
            raise InvalidRequest(f"project {project!r} is not the project cloud {self.cloud} acts for; "
                                 f"use --project {mine}")

    def reserve(self, project: str, migration: str, volume_type: str, sizes_gib: list[int], *,
                snapshots: bool = False) -> Reservation:
        """Pre-check only: Cinder's quota with usage must hold every volume (and, when the migration
        ends with snapshots, their gigabytes too: Cinder counts snapshots in gigabytes quotas);
        creating the volumes takes it."""
        self._check_project(project)
        rep = self.quota(project)
        n, gib = len(sizes_gib), sum(sizes_gib) * (2 if snapshots else 1)
        need = {"volumes": n, "gigabytes": gib, f"volumes_{volume_type}": n, f"gigabytes_{volume_type}": gib}
        if snapshots:
            need |= {"snapshots": n, f"snapshots_{volume_type}": n}
        for key, want in need.items():
            u = rep.quotas.get(key)
            if u is None or u.limit < 0 or u.in_use + u.reserved + want <= u.limit:
                continue
            unit = " GiB" if key.startswith("gigabytes") else ""
            with_snaps = " (volumes and their post-migration snapshots; --no-snapshot halves it)" \
                if snapshots and key.startswith("gigabytes") else ""
            raise QuotaExceeded(
                f"Cinder quota {key} of project {project} exceeded: requested {want}{unit}{with_snaps}, limit "
                f"{u.limit}{unit}, in use {u.in_use}{unit}, reserved {u.reserved}{unit}")
        return Reservation(id=f"cinder:{migration}", project=project, volume_type=volume_type,
                           volumes=len(sizes_gib), gigabytes=sum(sizes_gib), held_by_volumes=True)

    def release(self, reservation_id: str) -> None:
        """Nothing is held apart from the volumes themselves."""

    def release_migration(self, migration: str) -> None:
        """Nothing is held apart from the volumes themselves."""

    # ------------------------------------------------------------------ volumes

    def _ref(self, v) -> VolumeRef:
        meta = {k: str(x) for k, x in (v.metadata or {}).items()}
        host = v.host or ""
        return VolumeRef(
            id=v.id, name=v.name or "", project=v.project_id or "", size_gib=v.size or 0,
            volume_type=v.volume_type or "", backend=host.split("@", 1)[-1].split("#", 1)[0] if "@" in host else host,
            availability_zone=v.availability_zone or "", status=v.status or "",
            bootable=str(v.is_bootable).lower() == "true", encrypted=str(v.is_encrypted).lower() == "true",
            metadata=meta, created_at=v.created_at,
        )

    def _find(self, migration: str, disk_index: int, name: str) -> list:
        vols = self._call(f"list volumes named {name}", lambda: list(self.bs.volumes(details=True, name=name)))
        return [v for v in vols if (v.metadata or {}).get(META_MIGRATION) == migration
                and (v.metadata or {}).get(META_DISK) == str(disk_index)]

    def _wait(self, resource, status: str, what: str):
        return self._call(what, self.bs.wait_for_status, resource, status, failures=["error"], interval=0.5,
                          wait=WAIT_S)

    def create_volume(self, *, reservation_id: str, migration: str, disk_index: int, name: str, size_gib: int,
                      volume_type: str, availability_zone: str, metadata: dict[str, str]) -> VolumeRef:
        for v in self._find(migration, disk_index, name):
            if v.status == "error":  # a create the backend failed: useless, make it again
                self._delete(v)
                continue
            if v.status == "creating":
                v = self._wait(v, "available", f"volume {v.id} being created")
            return self._ref(v)
        meta = {**metadata, META_MIGRATION: migration, META_DISK: str(disk_index)}
        v = self._call(f"create volume {name}", self.bs.create_volume, name=name, size=size_gib,
                       volume_type=volume_type, availability_zone=availability_zone or None, metadata=meta,
                       description=f"xms migration {migration}, disk {disk_index}")
        faults.point("after-volume-create")  # tests: the worker dies right after Cinder accepted it
        v = self._wait(v, "available", f"volume {v.id} being created")
        return self._ref(v)

    def get_volume(self, volume_id: str) -> VolumeRef:
        return self._ref(self._call(f"volume {volume_id}", self.bs.get_volume, volume_id))

    def list_volumes(self, *, project: str | None = None, migration: str | None = None) -> list[VolumeRef]:
        vols = self._call("list volumes", lambda: list(self.bs.volumes(details=True)))
        out = []
        for v in vols:
            meta = v.metadata or {}
            if META_MIGRATION not in meta or (migration and meta[META_MIGRATION] != migration):
                continue
            if project and v.project_id and v.project_id != project:
                continue
            out.append(self._ref(v))
        return sorted(out, key=lambda r: (r.metadata.get(META_MIGRATION, ""), int(r.metadata.get(META_DISK, 0))))

    def delete_volume(self, volume_id: str) -> None:
        openstack = _sdk()
        try:
            v = self.bs.get_volume(volume_id)
        except openstack.exceptions.NotFoundException:
            return
        self._delete(v)

    def _delete(self, v) -> None:
        bs = self.bs
        for s in self._call("list snapshots", lambda: list(bs.snapshots(details=True, volume_id=v.id))):
            self._call(f"delete snapshot {s.id}", bs.delete_snapshot, s, ignore_missing=True)
            self._call(f"snapshot {s.id} being deleted", bs.wait_for_delete, s, interval=0.5, wait=WAIT_S)
        self._drop_stale_attachments(v, None)  # a worker that died attached: the volume can go then
        if v.status in ("creating", "attaching", "detaching", "reserved", "in-use"):
            v = self._call(f"volume {v.id}", bs.wait_for_status, v, "available", failures=["error"],
                           interval=0.5, wait=60)
        self._call(f"delete volume {v.id}", bs.delete_volume, v, ignore_missing=True)
        self._call(f"volume {v.id} being deleted", bs.wait_for_delete, v, interval=0.5, wait=WAIT_S)

    @contextmanager
    def open_target(self, volume_id: str, *, writable: bool = True) -> Iterator[TargetEndpoint]:
        _, brick_connector = _brick()
        bs, v = self.bs, self._call(f"volume {volume_id}", self.bs.get_volume, volume_id)
        meta = v.metadata or {}
        fresh = meta.get(META_WRITTEN) != "1" and str(v.is_encrypted).lower() != "true"
        if writable and meta.get(META_WRITTEN) != "1":
            # cleared before the first byte: a writer dying half-way never leaves the next one
            # believing the volume still reads as zeroes
            self._call(f"metadata of volume {volume_id}", bs.set_volume_metadata, v, **{META_WRITTEN: "1"})
        props = _connector_properties()
        self._drop_stale_attachments(v, props.get("host"))
        att = self._call(f"attach volume {volume_id}", bs.create_attachment, v.id, connector=props,
                         mode="rw" if writable else "ro")
        try:
            info = dict(att.connection_info or {})
            if info.get("encrypted"):
                raise InvalidRequest(
                    f"volume {volume_id} is encrypted: writing it needs os-brick's encryptor and the cloud's key "
                    "manager on this worker, which xms does not configure yet; choose an unencrypted type")
            brick = brick_connector.InitiatorConnector.factory(
                info["driver_volume_type"].upper(), root_helper=None, conn=info, use_multipath=False)
            try:
                dev = brick.connect_volume(info)
            except Exception as e:
                raise AttachFailed(f"os-brick could not connect volume {volume_id}: {_one_line(e)}") from None
            try:
                self._call(f"complete attachment of {volume_id}", bs.complete_attachment, att)
                path, size = dev["path"], v.size * GiB
                fmt = info.get("format") or "raw"
                if fmt == "raw":
                    yield TargetEndpoint(kind="file", path=path, size=size, fresh=fresh)
                else:  # e.g. the NFS driver's qcow2 overlay after a snapshot
                    with serve_image(["-f", fmt, path], self.run_dir, writable=writable,
                                     what=f"volume {volume_id}") as uri:
                        yield TargetEndpoint(kind="nbd", uri=uri, size=size, fresh=fresh)
            finally:
                brick.disconnect_volume(info, dev)
        finally:
            self._call(f"detach volume {volume_id}", bs.delete_attachment, att, ignore_missing=True)
            self._call(f"volume {volume_id} being detached", bs.wait_for_status, v, "available",
                       failures=["error"], interval=0.5, wait=WAIT_S)

    def _drop_stale_attachments(self, v, host: str | None) -> None:
        """Attachments to ``host`` (None: any) left by a worker that died attached (one activity per
        volume at a time)."""
        for a in v.attachments or []:
            if host and a.get("host_name") not in (None, host):
                continue
            self._call("delete stale attachment", self.bs.delete_attachment, a.get("attachment_id") or a.get("id"),
                       ignore_missing=True)
        if v.attachments:
            self._call(f"volume {v.id} being detached", self.bs.wait_for_status, v, "available",
                       failures=["error"], interval=0.5, wait=WAIT_S)

    def set_bootable(self, volume_id: str, bootable: bool) -> VolumeRef:
        self._call(f"bootable flag of {volume_id}", self.bs.set_volume_bootable_status, volume_id, bootable)
        return self.get_volume(volume_id)

    def update_metadata(self, volume_id: str, metadata: dict[str, str]) -> VolumeRef:
        self._call(f"metadata of volume {volume_id}", self.bs.set_volume_metadata, volume_id,
                   **{k: str(x) for k, x in metadata.items()})
        return self.get_volume(volume_id)

    # ------------------------------------------------------------------ snapshots, backups, instances

    def _snap(self, s) -> SnapshotRef:
        return SnapshotRef(id=s.id, name=s.name or "", volume_id=s.volume_id, size_gib=s.size or 0,
                           status=s.status or "")

    def create_snapshot(self, volume_id: str, name: str) -> SnapshotRef:
        bs = self.bs
        found = [s for s in self._call("list snapshots", lambda: list(bs.snapshots(details=True, volume_id=volume_id)))
                 if s.name == name and s.status != "error"]
        s = found[0] if found else self._call(f"snapshot of {volume_id}", bs.create_snapshot, volume_id=volume_id,
                                              name=name, force=True)
        s = self._wait(s, "available", f"snapshot {s.id}")
        return self._snap(s)

    def list_snapshots(self, volume_id: str | None = None) -> list[SnapshotRef]:
        q = {"volume_id": volume_id} if volume_id else {}
        return [self._snap(s) for s in self._call("list snapshots", lambda: list(self.bs.snapshots(details=True, **q)))]

    def create_backup(self, volume_id: str, name: str) -> str:
        """A backup through the backup API where the cloud runs cinder-backup; else why not."""
        openstack, bs = _sdk(), self.bs
        try:
            services = [s for s in bs.services() if s.binary == "cinder-backup"]
        except openstack.exceptions.ForbiddenException:
            services = None  # not admin: try, and report what Cinder says
        if services is not None and not any(s.state == "up" and s.status == "enabled" for s in services):
            return "no backup: the cloud runs no cinder-backup service"
        found = [b for b in bs.backups(details=True, volume_id=volume_id) if b.name == name and b.status != "error"]
        try:
            b = found[0] if found else bs.create_backup(volume_id=volume_id, name=name, force=True)
        except openstack.exceptions.HttpException as e:
            return f"no backup: Cinder answered {e.status_code}: {_one_line(e)}"
        b = self._wait(b, "available", f"backup {b.id}")
        return f"backup {b.id}"

    def ensure_instance(self, name: str, project: str) -> InstanceRef:
        """The instance record is the volumes' metadata (``xms.instance`` and ``xms.boot_index``);
        ``launch_instance`` makes a server from it when a flavor and network are given."""
        return self._instance(name, project)

    def get_instance(self, name: str) -> InstanceRef | None:
        inst = self._instance(name)
        return inst if inst.volume_ids else None

    def _instance(self, name: str, project: str = "") -> InstanceRef:
        vols = [v for v in self.list_volumes() if v.metadata.get(META_INSTANCE) == name]
        vols.sort(key=lambda v: int(v.metadata.get(META_BOOT_INDEX, 0)))
        server = self._server(name) if vols else None
        return InstanceRef(id=server.id if server else f"volumes:{name}", name=name,
                           project=project or (vols[0].project if vols else ""), volume_ids=[v.id for v in vols])

    def attach(self, instance_id: str, volume_id: str, index: int) -> InstanceRef:
        name = instance_id.removeprefix("volumes:")
        self.update_metadata(volume_id, {META_INSTANCE: name, META_BOOT_INDEX: str(index)})
        return self._instance(name)

    # ------------------------------------------------------------------ servers (Nova, Neutron)

    def _compute(self):
        """Nova's proxy, or None when the cloud has no compute service (openstacksdk then hands out
        a generic proxy without the compute calls, or raises on access)."""
        try:
            c = self.conn.compute
            return c if hasattr(c, "servers") else None
        except _sdk().exceptions.SDKException:
            return None

    def _server(self, name: str):
        """The server ``launch_instance`` made for migration ``name`` (by name and metadata), if any."""
        c = self._compute()
        if c is None:
            return None  # no compute service in this cloud: no server either
        found = self._call("servers", lambda: list(c.servers(details=True, name=f"^{re.escape(name)}$")), service="Nova")
        return next((s for s in found if (s.metadata or {}).get(META_MIGRATION) == name), None)

    def check_launch(self, flavor: str, network: str):
        """The flavor and network, looked up by name or id; one line naming what exists if not."""
        c = self.conn
        if self._compute() is None:
            raise InvalidRequest(f"cloud {self.cloud!r} has no compute service (Nova): --flavor and --network "
                                 "cannot be used; omit them to migrate the volumes only")
        fl = self._call("flavors", c.compute.find_flavor, flavor, ignore_missing=True, service="Nova")
        if fl is None:
            names = sorted(f.name for f in self._call("flavors", c.compute.flavors, service="Nova"))
            raise InvalidRequest(f"flavor {flavor!r} does not exist; allowed: {', '.join(names) or '(none)'}")
        net = self._call("networks", c.network.find_network, network, ignore_missing=True, service="Neutron")
        if net is None:
            names = sorted(n.name for n in self._call("networks", c.network.networks, service="Neutron"))
            raise InvalidRequest(f"network {network!r} does not exist; allowed: {', '.join(names) or '(none)'}")
        self._check_compute_quota(fl)
        return fl, net

    def _check_compute_quota(self, fl) -> None:
        """The server's instances/cores/ram against the project's Nova limits (the limits API: what
        this project may use and uses), before any volume exists."""
        a = self._call("compute limits", self.conn.compute.get_limits, service="Nova").absolute
        for key, limit, used, need, unit in (
            ("instances", a.instances, a.instances_used, 1, ""),
            ("cores", a.total_cores, a.total_cores_used, fl.vcpus or 0, ""),
            ("ram", a.total_ram, a.total_ram_used, fl.ram or 0, " MiB"),
        ):
            if limit is None or limit < 0:
                continue  # unlimited
            if (used or 0) + need > limit:
                raise QuotaExceeded(f"Nova quota {key}: flavor {fl.name} needs {need}{unit}, limit {limit}{unit}, "
                                    f"in use {used or 0}{unit}; choose a smaller flavor or raise the project's quota")

    def launch_instance(self, name: str, project: str, volume_ids: list[str], flavor: str, network: str) -> InstanceRef:
        """Boot-from-volume: one block-device mapping per volume, boot_index in disk order (the
        first is the boot disk), volumes kept when the server is deleted. A retry finds the server
        it already made; a server that goes to ERROR is deleted and reported with Nova's fault."""
        c = self.conn
        server = self._server(name)
        if server is None:
            fl, net = self.check_launch(flavor, network)
            bdm = [{"uuid": vid, "source_type": "volume", "destination_type": "volume", "boot_index": i,
                    "delete_on_termination": False} for i, vid in enumerate(volume_ids)]
            try:
                server = self._call("create server", c.compute.create_server, service="Nova", name=name,
                                    flavor_id=fl.id, networks=[{"uuid": net.id}], block_device_mapping=bdm,
                                    metadata={META_MIGRATION: name})
            except (InvalidRequest, NotFound) as e:  # Nova refused it (quota, policy, a volume it won't boot)
                raise LaunchFailed(f"Nova refused server {name}: {e}; the volumes are kept") from None
        try:
            server = c.compute.wait_for_server(server, status="ACTIVE", failures=["ERROR"], wait=WAIT_S)
        except _sdk().exceptions.ResourceFailure:
            server = self._call(f"server {server.id}", c.compute.get_server, server.id, service="Nova")
            fault = (server.fault or {}).get("message") or "no fault message"
            self._delete_server(server)
            raise LaunchFailed(f"server {name} ({server.id}) went to ERROR: {fault}; it was deleted, the volumes are "
                               "kept (launch them with another flavor or network, or `xms cleanup`)") from None
        except _sdk().exceptions.ResourceTimeout:
            raise TransientIOError(f"server {name} ({server.id}) is not ACTIVE after {WAIT_S} s") from None
        return InstanceRef(id=server.id, name=name, project=project, volume_ids=list(volume_ids))

    def _delete_server(self, server) -> None:
        c = self.conn
        self._call(f"delete server {server.id}", c.compute.delete_server, server, ignore_missing=True, service="Nova")
        self._call(f"delete server {server.id}", c.compute.wait_for_delete, server, wait=WAIT_S, service="Nova")

    def instance_console(self, instance_id: str) -> str | None:
        if instance_id.startswith("volumes:"):
            return None  # no server: the worker boots the volumes itself
        out = self._call(f"console of server {instance_id}", self.conn.compute.get_server_console_output,
                         instance_id, service="Nova")
        return (out or {}).get("output") or ""

    def delete_instance(self, name: str) -> None:
        """Delete the server made for the migration, if any (Nova detaches its volumes); the volumes
        themselves go with cleanup."""
        server = self._server(name)
        if server is not None:
            self._delete_server(server)


# ---------------------------------------------------------------------------- helpers


def _brick():
    """os-brick, imported quietly: it pulls in eventlet (deprecation warnings) and logs at WARNING
    about initiators this host does not have (iSCSI, NVMe-oF) on every connector lookup."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import os_brick.privileged
        from os_brick.initiator import connector as brick_connector
    logging.getLogger("os_brick").setLevel(logging.ERROR)
    return os_brick, brick_connector


def _connector_properties() -> dict:
    """This host's connector (os-brick), privileged calls run in-process: the worker is root."""
    os_brick, brick_connector = _brick()

    os_brick.privileged.default.set_client_mode(False)
    os_brick.privileged.brick_privsep_hide_output.set_client_mode(False)
    return brick_connector.get_connector_properties(root_helper=None, my_ip=_my_ip(), multipath=False,
                                                    enforce_multipath=False, host=socket.gethostname())


def _my_ip() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _quota_error(text: str) -> QuotaExceeded:
    """Cinder's 413 with its numbers: 'Requested 10G, quota is 5G and 1G has been consumed'."""
    line = _one_line(text)
    m = _QUOTA_413.search(line)
    key = re.search(r"allowed (\S+) quota", line)
    if m:
        return QuotaExceeded(f"Cinder refused: quota {key.group(1) if key else 'gigabytes'} exceeded: requested "
                             f"{m.group(1)} GiB, limit {m.group(2)} GiB, in use {m.group(3)} GiB ({line})")
    return QuotaExceeded(f"Cinder refused: {line}")


def _one_line(e) -> str:
    return " ".join(str(e).split())[:500]


def _int(v) -> int:
    try:
        return max(0, int(float(v)))
    except (TypeError, ValueError):
        return 0


def open_openstack_store(settings) -> OpenStackBlockStore:
    if not settings.cloud:
        raise ConfigInvalid("XMS_TARGET=openstack needs a cloud: set OS_CLOUD (or XMS_CLOUD) to a clouds.yaml entry")
    return OpenStackBlockStore(settings.cloud, settings.run_dir)
