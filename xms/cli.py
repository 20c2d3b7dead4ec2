"""The ``xms`` command line. Every read command has --json; every error is one line and exit 1."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from functools import wraps
from pathlib import Path

import click
import pydantic
from rich.console import Console
from rich.table import Table

from xms import client as xc
from xms.errors import XmsError
from xms.models import GiB, MiB, Phase
from xms.settings import Settings, get_settings
from xms.telemetry import configure_logging

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1):
    err.print(f"xms: error: {' '.join(str(message).split())}", markup=False, soft_wrap=True)
    sys.exit(code)


def command(fn):
    """Run an async command; XmsErrors become one line on stderr and exit 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                asyncio.run(result)
        except XmsError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as e:  # unexpected: still one line, the traceback with XMS_DEBUG=1
            if isinstance(e, pydantic.ValidationError) and e.title == "Settings":  # a bad XMS_* variable:
                # its name and what it may be, never its value (it may be the payload key)
                fail("; ".join(f"XMS_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors()))
            if os.environ.get("XMS_DEBUG"):
                raise
            fail(f"{type(e).__name__}: {e} (XMS_DEBUG=1 shows the traceback)")

    return wrapper


def settings_from(temporal: str | None) -> Settings:
    s = get_settings()
    if temporal:
        s = s.model_copy(update={"temporal_address": temporal})
    configure_logging(s.log_format, s.log_level)
    return s


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


temporal_opt = click.option("--temporal", metavar="HOST:PORT", help="Temporal frontend (default $XMS_TEMPORAL_ADDRESS or 127.0.0.1:7233)")
json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """xms: migrate virtual-machine disks into block storage, durably (Temporal)."""


# ------------------------------------------------------------------------------ processes


@cli.group()
def instance():
    """Target instances of the embedded store (made by a migration's Finalize)."""


@instance.command("start")
@click.argument("name")
@click.option("--firmware", type=click.Choice(["auto", "bios", "uefi"]), default="auto", show_default=True,
              help="auto: what the migration's inspection found (bios when none)")
@click.option("--marker", default=None, metavar="TEXT",
              help="Wait for this serial-console line, report the boot time, then stop the VM")
@click.option("--timeout", default=600, show_default=True, help="Seconds to wait for --marker")
@click.option("--snapshot", is_flag=True, help="Discard the guest's writes (a throw-away overlay)")
@temporal_opt
@json_opt
@command
async def instance_start(name, firmware, marker, timeout, snapshot, temporal, as_json):
    """Start instance NAME as a qemu VM from its volumes in boot order (KVM where usable, else TCG)."""
    import subprocess

    from activities import guest

    s = settings_from(temporal)
    store = _store(s)
    inst = store.get_instance(name)
    if inst is None or not inst.volume_ids:
        fail(f"no instance named {name!r}; a migration's Finalize makes one (see `xms list`)")
    vols = [store.get_volume(v) for v in inst.volume_ids]
    if any(not v.path or v.format != "raw" for v in vols):
        fail(f"instance {name}: only raw volumes of the embedded store can be started here")
    if firmware == "auto":
        firmware = "bios"
        try:
            v = await xc.view(await xc.connect(s), name)
            firmware = (v.guest.firmware if v.guest else None) or "bios"
        except Exception:  # the migration's history may be gone; BIOS is what most guests use
            pass
    log = s.data_dir / "instances" / name / "serial.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    paths = [v.path for v in vols]
    if marker:
        secs = guest.boot(paths, firmware=firmware, marker=marker, timeout_s=timeout, serial_log=str(log),
                          snapshot=snapshot)
        line = next((ln for ln in log.read_text(errors="replace").splitlines() if marker in ln), marker).strip()
        if as_json:
            return emit_json({"instance": name, "firmware": firmware, "boot_s": round(secs, 1), "marker_line": line,
                              "serial_log": str(log)})
        out.print(f"instance {name} booted ({firmware}, {guest.accel()}): {line!r} after {secs:.1f} s; "
                  f"serial log {log}", markup=False)
        return
    if firmware == "uefi":
        fail("an interactive UEFI console is not supported yet; use --marker to boot a UEFI guest")
    acc = guest.accel()
    cmd = ["qemu-system-x86_64", "-accel", acc, *(["-cpu", "host"] if acc == "kvm" else []), "-m", "1024",
           "-nographic", "-nodefaults", "-serial", "mon:stdio", *(["-snapshot"] if snapshot else [])]
    for i, p in enumerate(paths):
        cmd += ["-drive", f"file={p},format=raw,if=none,id=d{i}", "-device", f"virtio-blk-pci,drive=d{i},bootindex={i}"]
    out.print(f"starting {name}: {' '.join(cmd)}  (Ctrl-A X quits)", markup=False)
    raise SystemExit(subprocess.call(cmd))


@cli.command()
@click.option("--temporal", metavar="HOST:PORT", help="Use this existing Temporal cluster; start no dev server")
@command
async def server(temporal):
    """Embedded stack: Temporal dev server (SQLite under the data dir, Web UI), worker, metrics."""
    from workers.server import serve

    s = settings_from(temporal)
    if not temporal:
        err.print(f"xms server: Temporal {s.temporal_address}, Web UI {s.ui_url}, "
                  f"metrics http://127.0.0.1:{s.metrics_port}/metrics, data {s.data_dir}", markup=False)
    await serve(s, start_temporal=not temporal)


@cli.command()
@temporal_opt
@click.option("--metrics/--no-metrics", default=True, help="Serve Prometheus metrics on $XMS_METRICS_PORT")
@command
async def worker(temporal, metrics):
    """A worker only, for an existing Temporal cluster."""
    from workers.server import embedded

    s = settings_from(temporal)
    async with embedded(s, start_temporal=False, metrics=metrics) as (stop, task):
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await task


# ------------------------------------------------------------------------------ migrations


@cli.command()
@click.argument("name")
@click.option("--disk", "disks", multiple=True, required=True, metavar="SRC",
              help="nbd://…, nbd+unix:///…?socket=…, or a local qcow2/raw image; once per disk, boot disk first")
@click.option("--project", required=True)
@click.option("--volume-type", required=True)
@click.option("--az", default=None, help="Availability zone (must be one the volume type serves)")
@click.option("--mode", type=click.Choice(["cold", "warm"]), default="cold", show_default=True)
@click.option("--sync-interval", default="15m", show_default=True, metavar="DURATION",
              help="Warm: time between incremental syncs (e.g. 30s, 15m, 2h)")
@click.option("--cutover-at", default=None, metavar="ISO8601", help="Warm: cut over by itself at this time")
@click.option("--bitmap", default=None, help="Warm, NBD sources: the dirty bitmap the server exports")
@click.option("--power-off-hook", default=None, metavar="NAME",
              help="Warm: the worker's configured hook that powers the source off at cutover")
@click.option("--no-snapshot", is_flag=True, help="Skip the post-migration snapshot")
@click.option("--keep-on-failure", is_flag=True, help="Keep created volumes if the migration fails")
@click.option("--heartbeat-timeout", default=30, show_default=True, help="Seconds before a silent copy is retried")
@click.option("--guest-conversion", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
              help="auto: convert a guest OS found on the volumes (virt-v2v-in-place); data disks are left as they are")
@click.option("--boot-marker", default=None, metavar="TEXT",
              help="Boot the target at the end and wait for this line on its serial console")
@click.option("--boot-timeout", default=600, show_default=True, help="Seconds to wait for --boot-marker")
@click.option("--flavor", default=None, help="OpenStack: launch a server of this flavor, booted from the volumes")
@click.option("--network", default=None, help="OpenStack: the network the server's port is on (with --flavor)")
@click.option("--wait", is_flag=True, help="Wait for the migration to end, showing progress")
@temporal_opt
@json_opt
@command
async def migrate(name, disks, project, volume_type, az, mode, sync_interval, cutover_at, bitmap, power_off_hook,
                  no_snapshot, keep_on_failure, heartbeat_timeout, guest_conversion, boot_marker, boot_timeout, flavor,
                  network, wait, temporal, as_json):
    """Start migration NAME (its Temporal workflow id). Refused at once if invalid or over quota."""
    s = settings_from(temporal)
    srcs = [d if "://" in d else str(Path(d).expanduser().resolve()) for d in disks]
    req = xc.build_request(name=name, disks=srcs, project=project, volume_type=volume_type,
                           availability_zone=az, mode=mode, snapshot=not no_snapshot,
                           keep_on_failure=keep_on_failure, heartbeat_timeout_s=heartbeat_timeout,
                           sync_interval_s=parse_duration(sync_interval), cutover_at=cutover_at, bitmap=bitmap,
                           power_off_hook=power_off_hook, target=s.target, guest_conversion=guest_conversion,
                           boot_marker=boot_marker, boot_timeout_s=boot_timeout, flavor=flavor, network=network,
                           cloud=s.cloud if s.target == "openstack" else None)
    c = await xc.connect(s)
    adm = await xc.submit(c, s, req)
    if not wait:
        if as_json:
            emit_json({"name": name, "accepted": True, "footprint_gib": adm.footprint_gib,
                       "reservation_id": adm.reservation_id})
        else:
            out.print(f"migration {name} accepted: {adm.footprint_gib} GiB reserved in {project}; "
                      f"`xms status {name} --watch` follows it; Web UI {s.ui_url}/{name}")
        return
    v = await watch(c, name, quiet=as_json)
    if as_json:
        emit_json(v.model_dump(mode="json"))
    if v.phase != Phase.COMPLETED:
        fail(f"migration {name} {v.phase.value}: {v.reason}")


def parse_duration(text: str) -> int:
    """'90', '30s', '15m', '2h', '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "s")
    if not num.isdigit() or int(num) <= 0:
        raise XmsError(f"--sync-interval {text!r}: expected a positive duration such as 30s, 15m, 2h")
    return int(num) * units[unit]


@cli.command("sync-now")
@click.argument("name")
@temporal_opt
@command
async def sync_now(name, temporal):
    """Start an incremental sync of a Ready warm migration at once."""
    s = settings_from(temporal)
    await xc.sync_now(await xc.connect(s), name)
    out.print(f"sync of {name} requested; `xms status {name}` shows it")


@cli.command()
@click.argument("name")
@temporal_opt
@json_opt
@command
async def cutover(name, temporal, as_json):
    """Cut a warm migration over (final delta, power-off, conversion, finalize, snapshot) and wait.
    Refused unless it is Ready with at least one incremental sync done; joins one in progress."""
    s = settings_from(temporal)
    r = await xc.cutover(await xc.connect(s), name)
    if as_json:
        emit_json(r.model_dump(mode="json"))
    else:
        out.print(f"cutover of {name}: {r.phase.value}" + (f" ({r.reason})" if r.reason else ""))
    if r.phase != Phase.COMPLETED:
        sys.exit(1)


async def watch(c, name: str, quiet: bool = False, interval: float = 1.0) -> xc.MigrationView:
    last, shown = None, {}
    while True:
        v = await xc.view(c, name)
        if not quiet:
            line = f"{v.phase.value}/{v.step}"
            if line != last:
                out.print(f"[{time.strftime('%H:%M:%S')}] {name}: {line}")
                last = line
            for d in v.disks:
                if d.copy_state in ("copying", "verifying", "retrying") and shown.get(d.index) != d.bytes_copied:
                    shown[d.index] = d.bytes_copied
                    out.print(f"    disk{d.index}: {_progress(d)}", markup=False)
        if v.phase.terminal:
            return v
        await asyncio.sleep(interval)  # polling the status query for display


@cli.command()
@click.argument("name")
@click.option("--watch", "follow", is_flag=True, help="Refresh until the migration ends")
@temporal_opt
@json_opt
@command
async def status(name, follow, temporal, as_json):
    """Phase, and per disk: source, volume, bytes copied/total, throughput, ETA, resumed-from."""
    s = settings_from(temporal)
    c = await xc.connect(s)
    while True:
        v = await xc.view(c, name)
        if as_json:
            emit_json(v.model_dump(mode="json"))
        else:
            render_status(v)
        if not follow or v.phase.terminal:
            break
        await asyncio.sleep(2)  # refresh period of --watch
    if v.phase in (Phase.FAILED, Phase.CANCELLED) and not as_json:
        sys.exit(1)


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _progress(d: xc.DiskView) -> str:
    pct = 100 * d.bytes_copied / d.data_bytes_total if d.data_bytes_total else 100.0
    eta = f"ETA {d.eta_s:.0f}s" if d.eta_s is not None and d.copy_state != "done" else ""
    resumed = f"resumed from {_size(d.resumed_from)}" if d.resumed_from else ""
    return " ".join(x for x in [f"{_size(d.bytes_copied)}/{_size(d.data_bytes_total)} ({pct:.0f}%)",
                                f"{d.throughput / MiB:.0f} MiB/s", eta, resumed, d.copy_state] if x)


def render_status(v: xc.MigrationView) -> None:
    out.print(f"[bold]{v.name}[/bold]  phase [bold]{v.phase.value}[/bold] ({v.step})  status {v.status}  "
              f"mode {v.mode}  target {v.target}  project {v.project}  type {v.volume_type}  "
              f"az {v.availability_zone or '-'}")
    if v.reason:
        out.print(f"reason: {v.reason}", markup=False)
    for w in v.warnings:
        out.print(f"warning: {w}", markup=False)
    if v.mode == "warm":
        ls = v.last_sync
        parts = [f"syncs {v.syncs_done} done, {v.syncs_failed} failed"]
        if ls:
            parts.append(f"last: generation {ls.generation} at {ls.started_at:%H:%M:%S}, {ls.duration_s:.1f}s, "
                         f"{_size(ls.bytes_read)} read" + ("" if ls.ok else f", FAILED: {ls.error}"))
        if v.lag_s is not None:
            parts.append(f"lag {v.lag_s:.0f}s")
        if v.next_sync_at:
            parts.append(f"next sync {v.next_sync_at}")
        if v.cutover:
            parts.append(f"cutover requested {v.cutover.requested_at:%H:%M:%S} by {v.cutover.requested_by}")
        out.print("  ".join(parts), markup=False)
    if v.guest:
        g = v.guest
        what = "data disk(s)" if g.data_disk else " ".join(x for x in [g.product_name or g.os_type, g.firmware and
                                                                       f"firmware {g.firmware}", g.root_device and
                                                                       f"root {g.root_device}"] if x)
        out.print(f"guest: {what or '-'} — {g.note}", markup=False)
    if v.boot:
        since = f", {v.boot.since_cutover_s:.0f} s after the cutover request" if v.boot.since_cutover_s else ""
        out.print(f"first boot: marker after {v.boot.seconds:.0f} s{since}: {v.boot.marker_line} "
                  f"(serial log {v.boot.serial_log})", markup=False)
    t = Table(box=None)
    for col in ("disk", "source", "volume", "size", "copied / data", "throughput", "ETA", "resumed from", "checksum"):
        t.add_column(col)
    for d in v.disks:
        pct = f" ({100 * d.bytes_copied / d.data_bytes_total:.0f}%)" if d.data_bytes_total else ""
        t.add_row(
            str(d.index), d.source, d.volume_id or "-",
            f"{_size(d.virtual_size)} → {d.volume_size_gib} GiB" if d.virtual_size else "-",
            f"{_size(d.bytes_copied)} / {_size(d.data_bytes_total)}{pct} {d.copy_state}",
            f"{d.throughput / MiB:.0f} MiB/s" if d.throughput else "-",
            f"{d.eta_s:.0f}s" if d.eta_s is not None and d.copy_state != "done" else "-",
            _size(d.resumed_from) if d.resumed_from else "-",
            ("match " if d.match else "MISMATCH ") + (d.source_sha256 or "")[:16] if d.match is not None else "-",
        )
    out.print(t)


@cli.command("list")
@temporal_opt
@json_opt
@command
async def list_(temporal, as_json):
    """All migrations, newest first."""
    s = settings_from(temporal)
    rows = await xc.list_migrations(await xc.connect(s))
    if as_json:
        return emit_json(rows)
    t = Table(box=None)
    for col in ("name", "status", "phase", "started", "closed"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["status"], r["phase"] or "-", r["started"] or "-", r["closed"] or "-")
    out.print(t)


@cli.command()
@click.argument("name")
@temporal_opt
@command
async def cancel(name, temporal):
    """Cancel a running migration: its volumes are deleted and its quota released."""
    s = settings_from(temporal)
    await xc.cancel(await xc.connect(s), name)
    out.print(f"cancellation of {name} requested; `xms status {name}` shows when it is Cancelled")


@cli.command()
@click.argument("name")
@temporal_opt
@command
async def cleanup(name, temporal):
    """Delete what a failed migration kept (--keep-on-failure): its volumes and instance record."""
    s = settings_from(temporal)
    status_ = await xc.execution_status(await xc.connect(s), name)
    if status_ not in (None, "FAILED", "CANCELED", "TERMINATED", "TIMED_OUT"):
        fail(f"migration {name} is {status_}; cleanup only removes what a failed, cancelled or terminated "
             f"migration left (cancel a running one with `xms cancel {name}`)")
    n = remove_migration(_store(s), name)
    out.print(f"{name}: deleted {n} volume(s) and the instance record; reservation released")


# ------------------------------------------------------------------------------ block storage


def _store(s: Settings):
    from activities.blockstorage import open_store

    return open_store(s)


def remove_migration(store, name: str) -> int:
    """Delete a migration's instance record, volumes (with their snapshots) and reservation; the count
    of volumes deleted. Idempotent."""
    from activities.blockstorage import delete_migration_volumes

    n = len(delete_migration_volumes(store, name))
    store.release_migration(name)
    return n


@cli.command("volume-types")
@json_opt
@command
def volume_types(as_json):
    """Volume types: backend, availability zone, QoS write limits, encryption, granularity."""
    types = _store(settings_from(None)).volume_types()
    if as_json:
        return emit_json([t.model_dump() for t in types])
    t = Table(box=None)
    for col in ("name", "backend", "az", "qos write", "encrypted", "granularity", "description"):
        t.add_column(col)
    for vt in types:
        q = vt.qos
        qos = ", ".join(x for x in [f"{q.write_bytes_sec // MiB} MiB/s" if q.write_bytes_sec else "",
                                    f"{q.write_iops_sec} IOPS" if q.write_iops_sec else ""] if x) or "unlimited"
        t.add_row(vt.name, vt.backend, vt.availability_zone, qos, "yes" if vt.encrypted else "no",
                  f"{vt.granularity_gib} GiB", vt.description)
    out.print(t)


@cli.command()
@click.argument("project")
@click.option("--set", "sets", multiple=True, metavar="KEY=N",
              help="Set a limit: volumes, gigabytes, volumes_<type>, gigabytes_<type>; -1 = unlimited")
@json_opt
@command
def quota(project, sets, as_json):
    """A project's quota: limit, in use and reserved, per key."""
    store = _store(settings_from(None))
    if sets:
        limits = {}
        for kv in sets:
            k, sep, v = kv.partition("=")
            if not sep or not v.lstrip("-").isdigit():
                fail(f"--set {kv!r}: expected KEY=N, e.g. gigabytes=100 or gigabytes_standard-ssd=-1")
            limits[k] = int(v)
        from xms.config import check_quota_limits

        try:
            check_quota_limits(limits)
        except ValueError as e:
            fail(str(e))
        rep = store.set_quota(project, limits)
    else:
        rep = store.quota(project)
    if as_json:
        return emit_json(rep.model_dump())
    t = Table(title=f"quota for project {project}", box=None)
    for col in ("key", "limit", "in use", "reserved"):
        t.add_column(col)
    for k, u in rep.quotas.items():
        t.add_row(k, "unlimited" if u.limit < 0 else str(u.limit), str(u.in_use), str(u.reserved))
    out.print(t)


@cli.command()
@click.option("--project", default=None)
@json_opt
@command
def volumes(project, as_json):
    """Volumes: id, name, type, size, status, bootable, backend, file path and format."""
    vols = _store(settings_from(None)).list_volumes(project=project)
    if as_json:
        return emit_json([v.model_dump(mode="json") for v in vols])
    t = Table(box=None)
    for col in ("id", "name", "project", "type", "size", "status", "bootable", "backend", "az", "format", "path"):
        t.add_column(col, overflow="fold")
    for v in vols:
        t.add_row(v.id, v.name, v.project, v.volume_type, f"{v.size_gib} GiB", v.status,
                  "yes" if v.bootable else "no", v.backend, v.availability_zone, v.format, v.path)
    out.print(t)


# ------------------------------------------------------------------------------ demo


@cli.command()
@click.option("--size-gib", default=1, show_default=True, help="Size of the demo's first disk")
@command
async def demo(size_gib):
    """Build a two-disk sample VM (data and holes), migrate it cold, print phases and checksums."""
    from xms.demo import run_demo

    s = get_settings()
    configure_logging(s.log_format, os.environ.get("XMS_LOG_LEVEL", "warning"))
    await run_demo(s, size_gib=size_gib, console=out)


def main() -> None:
    """Run the CLI and leave with os._exit: a process that used a Temporal client can abort in
    interpreter finalization after success (sdk-python #300), which must not turn into a failure."""
    code = 0
    try:
        cli.main(prog_name="xms", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("xms: aborted")
        code = 130
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    from activities.transport import stop_image_server

    stop_image_server()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
