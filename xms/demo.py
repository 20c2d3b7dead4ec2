"""``xms demo``: a real cold migration of a two-disk sample VM on the embedded stack."""

from __future__ import annotations

import os
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


async def run_demo(settings: Settings, size_gib: int, console: Console) -> None:
    from workers.server import embedded

    demo_dir = settings.data_dir / "demo"
    console.print(f"building a two-disk sample VM in {demo_dir} …")
    disks = sample_vm(demo_dir, size_gib)
    started = False
    async with AsyncExitStack() as stack:
        if _reachable(settings.temporal_address):
            console.print(f"using the running xms server at {settings.temporal_address}")
        else:
            console.print("starting the embedded stack (Temporal dev server, worker, metrics) …")
            await stack.enter_async_context(embedded(settings, start_temporal=True))
            started = True
        c = await xc.connect(settings)
        name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        req = xc.build_request(name=name, disks=[str(d) for d in disks], project="demo",
                               volume_type="standard-ssd", mode="cold")
        adm = await xc.submit(c, settings, req)
        console.print(f"migration {name} accepted: {adm.footprint_gib} GiB reserved in project demo")
        from xms.cli import watch

        v = await watch(c, name)
        show_result(v, settings, console)
        if v.phase != Phase.COMPLETED:
            raise SystemExit(1)
        if started:  # say how to see it again
            console.print(f"the embedded stack stops now; `xms server` brings the Web UI back with this "
                          f"migration's history ({settings.data_dir / 'temporal.db'})")


def show_result(v: xc.MigrationView, settings: Settings, console: Console) -> None:
    console.print(f"\nphases: " + " → ".join(dict.fromkeys(f"{p}" for p, _, _ in v.history)))
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
