"""``xms demo``: a real cold migration of a two-disk sample VM on the embedded stack."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import time
from contextlib import AsyncExitStack
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xms import client as xc
from xms.models import GiB, MiB, Phase
from xms.settings import Settings

DEMO_PROJECT = "demo"


def make_disk(path: Path, size: int, regions: list[tuple[int, int]], fmt: str = "raw", seed: int = 0) -> Path:
    """A sparse disk of ``size`` bytes with random data in ``regions`` (offset, length) and holes elsewhere;
    the last 4 KiB and first 4 KiB hold data too, so the edges are exercised."""
    raw = path.with_suffix(".raw") if fmt != "raw" else path
    rnd = __import__("random").Random(seed)
    with open(raw, "wb") as f:
        f.truncate(size)
        for off, length in [*regions, (0, 4096), (size - 4096, 4096)]:
            f.seek(off)
            left = length
            while left:
                n = min(left, 4 * MiB)
                f.write(rnd.randbytes(n))
                left -= n
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()
    return path


def sample_vm(directory: Path, size_gib: int = 1) -> list[Path]:
    """Boot disk: qcow2 of ``size_gib`` GiB, ~45 % random data in scattered regions, the rest holes.
    Data disk: raw of 300 MiB + 12 KiB (not a multiple of 1 GiB), two data regions."""
    directory.mkdir(parents=True, exist_ok=True)
    size0 = size_gib * GiB
    regions0 = [(i * size0 // 8 + 1 * MiB, size0 // 8 - 32 * MiB) for i in range(0, 8, 2)]
    regions0 += [(i * size0 // 8 + 5 * MiB, 24 * MiB) for i in range(1, 8, 2)]
    disk0 = make_disk(directory / "boot.qcow2", size0, regions0, fmt="qcow2", seed=1)
    size1 = 300 * MiB + 12 * 1024
    disk1 = make_disk(directory / "data.raw", size1, [(16 * MiB, 64 * MiB), (200 * MiB, 8 * MiB)], seed=2)
    return [disk0, disk1]


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


async def run_demo(settings: Settings, size_gib: int, console: Console, modes: tuple[str, ...] = ("cold", "warm")) -> None:
    from activities.blockstorage import open_store
    from workers.server import embedded

    demo_dir = settings.data_dir / "demo"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = False
    _remove_earlier_demos(open_store(settings), console)
    async with AsyncExitStack() as stack:
        if _reachable(settings.temporal_address):
            console.print(f"using the running xms server at {settings.temporal_address}")
        else:
            console.print("starting the embedded stack (Temporal dev server, worker, metrics) …")
            await stack.enter_async_context(embedded(settings, start_temporal=True))
            started = True
        c = await xc.connect(settings)
        ok = True
        if "cold" in modes:
            ok &= await _cold(c, settings, console, demo_dir, stamp, size_gib)
        if "warm" in modes:
            ok &= await _warm(c, settings, console, demo_dir, stamp)
        if started:  # say how to see it again
            console.print(f"the embedded stack stops now; `xms server` brings the Web UI back with these "
                          f"migrations' history ({settings.data_dir / 'temporal.db'})", soft_wrap=True)
        if not ok:
            raise SystemExit(1)


def _remove_earlier_demos(store, console: Console) -> None:
    """Each demo keeps its volumes for inspection until the next demo starts: repeated demos must not
    fill the disk (each leaves ~1 GiB of volumes and snapshots). Only project "demo" is touched."""
    from xms.cli import remove_migration

    names = sorted({v.metadata.get("xms.migration", "") for v in store.list_volumes(project=DEMO_PROJECT)} - {""})
    n = sum(remove_migration(store, name) for name in names)
    if n:
        console.print(f"removed {n} volumes (and their snapshots) of {len(names)} earlier demo migrations "
                      f"in project {DEMO_PROJECT}", soft_wrap=True)


async def _cold(c, settings: Settings, console: Console, demo_dir: Path, stamp: str, size_gib: int) -> bool:
    from xms.cli import watch

    console.print(f"\n[bold]1. cold migration[/bold]: building a two-disk sample VM in {demo_dir} …")
    disks = sample_vm(demo_dir, size_gib)
    name = f"demo-cold-{stamp}"
    req = xc.build_request(name=name, disks=[str(d) for d in disks], project=DEMO_PROJECT,
                           volume_type="standard-ssd", mode="cold")
    adm = await xc.submit(c, settings, req)
    console.print(f"migration {name} accepted: {adm.footprint_gib} GiB reserved in project demo")
    v = await watch(c, name)
    show_result(v, settings, console)
    return v.phase == Phase.COMPLETED and all(d.match for d in v.disks)


async def _until(c, name: str, pred, what: str, timeout: float = 600) -> xc.MigrationView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await xc.view(c, name)
        if pred(v):
            return v
        if v.phase.terminal:
            raise SystemExit(f"{name} ended {v.phase.value} while waiting for {what}: {v.reason}")
        await asyncio.sleep(0.5)  # polling the status query for display
    raise SystemExit(f"{name}: timed out waiting for {what}")


async def _warm(c, settings: Settings, console: Console, demo_dir: Path, stamp: str) -> bool:
    console.print("\n[bold]2. warm migration[/bold]: a 512 MiB qcow2 disk tracked with persistent dirty bitmaps")
    demo_dir.mkdir(parents=True, exist_ok=True)
    app = make_disk(demo_dir / "app.qcow2", 512 * MiB, [(16 * MiB, 96 * MiB), (300 * MiB, 32 * MiB)],
                    fmt="qcow2", seed=3)
    name = f"demo-warm-{stamp}"
    req = xc.build_request(name=name, disks=[str(app)], project=DEMO_PROJECT, volume_type="standard-ssd",
                           mode="warm", sync_interval_s=3600)
    await xc.submit(c, settings, req)
    v = await _until(c, name, lambda v: v.phase == Phase.READY, "the full sync")
    d = v.disks[0]
    console.print(f"full sync done: {d.bytes_copied / MiB:.0f} MiB copied; phase Ready (next timed sync in 1h)")
    rng = random.Random(4)
    for i in (1, 2):
        cmds = []
        for _ in range(4):
            cmds += ["-c", f"write -P {rng.randint(1, 255)} {rng.randrange(0, 480) * MiB} {rng.randint(1, 8) * MiB}"]
        cmds += ["-c", f"write -z {16 * MiB + i * 8 * MiB} {4 * MiB}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(app)], check=True, capture_output=True)
        console.print("the source changed (4 random writes, one zeroed region); sync-now …")
        await xc.sync_now(c, name)
        v = await _until(c, name, lambda v, i=i: v.syncs_done == i and v.phase == Phase.READY, f"sync {i}")
        ls = v.last_sync
        console.print(f"incremental sync {i}: {ls.changed_bytes / MiB:.1f} MiB changed, {ls.bytes_read / MiB:.1f} MiB "
                      f"read, {ls.zero_bytes_written / MiB:.1f} MiB zeroed, {ls.duration_s:.1f}s; "
                      f"volumes: {v.volume_count}")
    console.print("cutover (power-off, final delta + verify, conversion, finalize, snapshot) …")
    r = await xc.cutover(c, name)
    v = await xc.view(c, name)
    show_result(v, settings, console)
    return r.phase == Phase.COMPLETED and all(d.match for d in v.disks)


def show_result(v: xc.MigrationView, settings: Settings, console: Console) -> None:
    console.print("\nphases: " + " → ".join(dict.fromkeys(f"{p}" for p, _, _ in v.history)))
    t = Table(title=f"{v.name}: {v.phase.value}", box=None)
    for col in ("disk", "source", "volume", "size", "data copied", "checksums match"):
        t.add_column(col)
    for d in v.disks:
        t.add_row(str(d.index), os.path.basename(d.source), d.volume_id or "-",
                  f"{d.virtual_size / MiB:.0f} MiB → {d.volume_size_gib} GiB", f"{d.bytes_copied / MiB:.0f} MiB",
                  "yes" if d.match else "NO")
    console.print(t)
    for d in v.disks:
        console.print(f"disk{d.index} source sha256 {d.source_sha256}", soft_wrap=True)
        console.print(f"disk{d.index} target sha256 {d.target_sha256}", soft_wrap=True)
    console.print(f"Web UI: {settings.ui_url}/{v.name}", soft_wrap=True)
