"""The xms benchmark suite: one command, its own inputs, every tool measured in the same run.

    .venv/bin/python -m benchmarks.run [--runs 5] [--workdir /var/tmp/xms-bench] [--json FILE] [--keep-inputs]

Measures, on the same NBD endpoints (qemu-nbd serving the source read-only and a fresh sparse
raw target): the xms copy engine, ``nbdcopy`` and ``qemu-img convert`` (median of N runs,
interleaved); then a cold migration end to end through Temporal against the bare engine on the
same source and the same kind of target; an incremental sync of a 1 %-changed disk against
the full copy (as a worker's later syncs run, in a process that has copied before, and as a
fresh process's first), for a quiesced qcow2 image and for a running QEMU's disk (a warm
migration's source, with nbdcopy on the same export for the full sync); peak RSS for a 1 GiB
and a 16 GiB sparse disk; 8 concurrent migrations on one worker against one; and a volume type
limited to 50 MiB/s. Prints a table and writes JSON.
The work directory (~25 GiB of inputs and targets) is removed at the end unless ``--keep-inputs``
(a later run then reuses the inputs); a ``--workdir`` of your own that was not empty is left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = Path("/var/tmp/xms-bench")
sys.path.insert(0, str(ROOT))

from xms.models import GiB, MiB  # noqa: E402

PY = sys.executable


# ------------------------------------------------------------------------------ helpers


# The measured command is started by a small launcher, not by this process: Linux carries the
# memory high-water mark of the process that execs into its rusage (exec records the old mm's
# peak), so a tool started from this runner reported the runner's RSS when that was larger (all
# three tools showed the same 63 MiB, and the memory stage 108 MiB after the Temporal stage).
# The launcher (python -S, ~8 MiB) forks the command and reports its wait4 figures.
_LAUNCH = """
import os, sys, time
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
sys.stderr.write(f"\\n@@launch {time.monotonic() - t0} {ru.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(argv: list[str]) -> dict:
    """Run a command (with this tree on PYTHONPATH, for the engine); its wall time and its own
    peak RSS (wait4, through _LAUNCH)."""
    p = subprocess.run([PY, "-S", "-c", _LAUNCH, *argv], capture_output=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    err, _, tail = p.stderr.decode().rpartition("\n@@launch ")
    if p.returncode != 0 or not tail:
        raise RuntimeError(f"{argv[0]} failed (exit {p.returncode}): {(err if tail else p.stderr.decode())[-500:]}")
    wall, maxrss_kib = tail.split()
    return {"wall_s": float(wall), "peak_rss_mib": int(maxrss_kib) / 1024, "stdout": p.stdout.decode()}


def make_disk(path: Path, size: int, data_every: int, data_len: int, seed: int) -> int:
    """Sparse raw disk with random ``data_len`` bytes at every ``data_every`` bytes; returns data bytes."""
    rng = random.Random(seed)
    total = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, data_every):
            f.seek(off)
            n = min(data_len, size - off)
            for pos in range(0, n, 8 * MiB):
                f.write(rng.randbytes(min(8 * MiB, n - pos)))
            total += n
    return total


class Server:
    """qemu-nbd on a unix socket (source read-only, target writable), persistent, shared."""

    def __init__(self, image: Path, sock: Path, fmt: str = "raw", readonly: bool = True, bitmap: str | None = None):
        argv = ["qemu-nbd", "-t", "-e", "16", "-f", fmt, "-k", str(sock)]
        if readonly:
            argv.append("-r")
        if bitmap:
            argv += ["-B", bitmap]
        self.sock = sock
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen([*argv, str(image)])
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd for {image} did not start")
            time.sleep(0.05)  # readiness poll

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def settle(*warm: Path) -> None:
    """The same start for every stage: nothing left to write back, and (as root, unless
    XMS_BENCH_KEEP_CACHES=1) an empty page cache with only the stage's sources read into it. A
    page cache filled by earlier stages makes every new page cost a reclaim: the same tools
    measured 30-50 % slower in that state. The stages that settle once then run one untimed copy
    before their timed ones: the first copy after this writes into memory the hypervisor has
    taken back (free page reporting) and ran up to 2x slower, whichever tool went first (nbdcopy
    --flush 213 MiB/s first, 396-449 after), so the tool measured first was measured on a slower
    machine."""
    os.sync()
    if os.geteuid() == 0 and os.environ.get("XMS_BENCH_KEEP_CACHES") != "1":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for p in warm:
        with open(p, "rb") as f:
            while f.readinto(_WARM):
                pass


_WARM = bytearray(8 * MiB)


def fresh_target(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


# ------------------------------------------------------------------------------ benchmarks


def source_4g(work: Path) -> Path:
    """The 4 GiB source of the full copy, Temporal and incremental stages (2 GiB of random data in
    64 MiB runs, holes between), made once per work directory: any stage can run alone."""
    src = work / "src-4g.raw"
    if not src.exists():
        make_disk(src, 4 * GiB, 128 * MiB, 64 * MiB, seed=1)
    return src


def full_copy(work: Path, runs: int) -> dict:
    size, data = 4 * GiB, 2 * GiB
    src = source_4g(work)
    dst = work / "dst-4g.raw"
    tools = {
        "xms": lambda s, d: [PY, "-m", "benchmarks.engine", s, d],
        "nbdcopy --flush": lambda s, d: ["nbdcopy", "--flush", "--destination-is-zero", s, d],
        "nbdcopy": lambda s, d: ["nbdcopy", "--destination-is-zero", s, d],
        "qemu-img convert": lambda s, d: ["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", s, d],
    }
    results: dict[str, list[dict]] = {t: [] for t in tools}
    names = list(tools)

    def one(name: str) -> dict:
        fresh_target(dst, size)
        d = Server(dst, work / "dst.sock", readonly=False)
        try:
            r = timed(tools[name](s.uri, d.uri))
        finally:
            d.stop()
        r["mib_s"] = r["wall_mib_s"] = mib_s(data, r["wall_s"])
        if name == "xms":
            # a worker is a running process: its copy is timed from the first connect to the
            # flush done (what a migration waits for); the wall time also pays the
            # interpreter's start and imports (~0.3 s), reported next to it
            st = json.loads(r.pop("stdout"))
            r.update(bytes_read=st["bytes_read"], bytes_written=st["bytes_written"],
                     mib_s=mib_s(data, st["elapsed_s"]))
        else:
            r.pop("stdout")
        return r

    settle(src)
    s = Server(src, work / "src.sock")
    try:
        one("qemu-img convert")  # untimed warm-up (see settle)
        for i in range(runs):
            for name in names[i % len(names):] + names[:i % len(names)]:  # interleaved, each first in turn
                r = one(name)
                results[name].append(r)
                print(f"  full copy run {i + 1}/{runs} {name:17s} {r['mib_s']:7.1f} MiB/s (wall {r['wall_mib_s']:.0f})  rss {r['peak_rss_mib']:.0f} MiB",
                      flush=True)
    finally:
        s.stop()
    out = {"size": size, "allocated": data, "tools": {}}
    for name, rs in results.items():
        out["tools"][name] = {
            "median_mib_s": statistics.median(r["mib_s"] for r in rs),
            "median_wall_mib_s": statistics.median(r["wall_mib_s"] for r in rs),
            "runs_mib_s": [round(r["mib_s"], 1) for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            **({"bytes_read": rs[-1]["bytes_read"], "bytes_written": rs[-1]["bytes_written"]} if name == "xms" else {}),
        }
    # xms always flushes the target before it reports a copy done: nbdcopy --flush is the like-for-like run
    nb = out["tools"]["nbdcopy --flush"]["median_mib_s"]
    for t in out["tools"].values():
        t["ratio_to_nbdcopy"] = t["median_mib_s"] / nb
        t["wall_ratio_to_nbdcopy"] = t["median_wall_mib_s"] / nb
    out["bytes_read_over_allocated"] = out["tools"]["xms"]["bytes_read"] / data
    return out


def bare_engine_file(src: Path, dst: Path, size: int, extra: list[str] | None = None) -> dict:
    fresh_target(dst, size)
    r = timed([PY, "-m", "benchmarks.engine", str(src), str(dst), "--src-image", "raw", "--dst-file", *(extra or [])])
    st = json.loads(r["stdout"])
    return {"mib_s": mib_s(st["bytes_read"], st["copy_s"]), "peak_rss_mib": r["peak_rss_mib"], **st}


def through_temporal(work: Path, pairs: int) -> dict:
    """Cold migrations through the embedded stack (dev server + worker process): one 4 GiB disk
    against the bare engine on the same source into the same kind of target (a local raw file);
    then 1 vs 8 concurrent migrations on one worker."""
    from tests.conftest import start_stack  # the same harness the tests use

    src = source_4g(work)
    shutil.rmtree(work / "stack", ignore_errors=True)  # a fresh Temporal database and store each run
    st = start_stack(work / "stack")
    try:
        bare, e2e = [], []

        def run_bare() -> None:
            settle(src)  # every run starts alike: nothing of the previous one in flight or cached
            bare.append(bare_engine_file(src, work / "bare-4g.raw", 4 * GiB)["mib_s"])
            print(f"  bare engine      {bare[-1]:7.1f} MiB/s", flush=True)

        def run_e2e(i: int) -> None:
            settle(src)
            r = st.cli("migrate", f"bench-e2e-{i}", "--disk", str(src), "--project", "bench", "--volume-type",
                       "standard-ssd", "--no-snapshot", "--wait", "--json", timeout=1800)
            assert r.returncode == 0, r.stderr
            e2e.append(json.loads(r.stdout)["disks"][0]["throughput"] / MiB)
            print(f"  through Temporal {e2e[-1]:7.1f} MiB/s", flush=True)
            for v in st.store().list_volumes(migration=f"bench-e2e-{i}"):
                st.store().delete_volume(v.id)

        for i in range(pairs):  # interleaved, each going first in turn: drift and page cache hit both alike
            for step in ((run_bare, lambda: run_e2e(i)) if i % 2 == 0 else (lambda: run_e2e(i), run_bare)):
                step()
        bare_m, e2e_m = statistics.median(bare), statistics.median(e2e)
        # concurrency: 512 MiB of data per disk
        disks = []
        for i in range(8):
            p = work / f"c{i}.raw"
            if not p.exists():
                make_disk(p, 1 * GiB, 64 * MiB, 32 * MiB, seed=10 + i)
            disks.append(p)

        def batch(names: list[str], ds: list[Path]) -> float:
            """Aggregate MiB/s of migrations started together, from the first submission to the
            last one's end: through the Temporal client in this process, awaiting each workflow's
            result (not `xms migrate --wait` per migration, which also timed an interpreter start
            (~0.7 CPU-s, on these same two cores) and up to 1 s of status polling, and so made a
            single migration look ~35 % slower than it is)."""
            return asyncio.run(_batch(st.env, names, ds))

        # CONCURRENCY_ROUNDS rounds of (one, eight, one), interleaved so that drift on this shared
        # host hits both alike; medians of each (one batch of eight is a single ~10 s sample, and
        # a slow spell of the host in it moved the ratio from ~1.0 to 0.78 in one run)
        ones, eights = [], []
        for r in range(CONCURRENCY_ROUNDS):
            for kind in ("one", "eight", "one"):
                settle(*disks)
                if kind == "one":
                    k = len(ones) % len(disks)
                    ones.append(batch([f"bench-one-{len(ones)}"], disks[k:k + 1]))
                else:
                    eights.append(batch([f"bench-eight-{r}-{i}" for i in range(8)], disks))
        one, eight = statistics.median(ones), statistics.median(eights)
        print(f"  one migration    {' '.join(f'{x:.0f}' for x in ones)} MiB/s; eight at once "
              f"{' '.join(f'{x:.0f}' for x in eights)} MiB/s", flush=True)
        # the worker's high-water mark after every migration above (each copied and verified)
        status = Path(f"/proc/{st.worker.pid}/status").read_text()
        worker_rss = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024
    finally:
        st.stop_worker()
        st.server.stop()
    return {"bare_engine_file_mib_s": bare_m, "temporal_copy_mib_s": e2e_m, "ratio": e2e_m / bare_m,
            "bare_runs": [round(x) for x in bare], "temporal_runs": [round(x) for x in e2e],
            "one_migration_mib_s": one, "one_migration_runs_mib_s": [round(x) for x in ones],
            "eight_migrations_aggregate_mib_s": eight, "eight_migrations_runs_mib_s": [round(x) for x in eights],
            "concurrency_ratio": eight / one,
            "worker_peak_rss_mib": worker_rss,
            "migrations_through_worker": pairs + (2 + 8) * CONCURRENCY_ROUNDS}


async def _batch(env: dict[str, str], names: list[str], disks: list[Path]) -> float:
    from xms import client as xc
    from xms.settings import Settings

    saved = dict(os.environ)
    os.environ.update(env)  # the stack's settings (data directory, Temporal address), for Settings()
    try:
        s = Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    c = await xc.connect(s)

    async def one(name: str, disk: Path):
        await xc.submit(c, s, xc.build_request(name=name, disks=[str(disk)], project="bench", volume_type="standard-ssd",
                                               snapshot=False, target=s.target))
        return await xc.wait(c, name)

    t0 = time.monotonic()
    views = await asyncio.gather(*(one(n, d) for n, d in zip(names, disks)))
    elapsed = time.monotonic() - t0
    bad = [f"{v.name}: {v.phase.value}" for v in views if v.phase.value != "Completed"]
    if bad:
        raise RuntimeError(f"benchmark migrations did not complete: {bad}")
    return mib_s(sum(v.disks[0].bytes_copied for v in views), elapsed)


def delta_blocks() -> list[tuple[int, int]]:
    """The 1 %-changed delta: (pattern byte, offset) of 64 KiB blocks at random block offsets."""
    rng = random.Random(5)
    return [(rng.randint(1, 255), rng.randrange(0, 4 * GiB // (64 * 1024)) * 64 * 1024)
            for _ in range(int(0.01 * 4 * GiB) // (64 * 1024))]


CONCURRENCY_ROUNDS = 3  # of (one migration, eight at once, one migration)
LATER_SYNCS = 3  # per process: a sync of ~50 ms varies by +-20 % on a shared host; 3 x ``runs`` samples


def sync_runs(argv: list[str], runs: int) -> tuple[list[float], list[float], dict]:
    """An incremental sync ``runs`` times, each in a process that syncs 1 + LATER_SYNCS times: its
    first sync pays what a fresh process pays (buffer pool, cold code); the later ones run as a
    worker's later syncs do, in a process that has copied before. (first-sync times, later-sync
    times, the last later sync's statistics)"""
    fresh_s, warm_s = [], []
    for _ in range(runs):
        os.sync()
        r = timed([*argv, "--repeat", str(1 + LATER_SYNCS)])
        first, *later = (json.loads(line) for line in r["stdout"].splitlines())
        fresh_s.append(first["elapsed_s"])
        warm_s += [x["elapsed_s"] for x in later]
        st = later[-1]
        times = " ".join(f"{x['elapsed_s']:.3f}" for x in later)
        print(f"  incremental      {times} s (fresh process "
              f"{fresh_s[-1]:.3f} s)  { {k: round(v, 4) for k, v in st['phases_s'].items()} }", flush=True)
    return fresh_s, warm_s, st


def sync_summary(full_s: list[float], fresh_s: list[float], inc_s: list[float], st: dict) -> dict:
    full_m, inc_m, fresh_m = statistics.median(full_s), statistics.median(inc_s), statistics.median(fresh_s)
    return {"full_s": full_m, "incremental_s": inc_m, "ratio": inc_m / full_m,
            "fresh_process_incremental_s": fresh_m, "fresh_process_ratio": fresh_m / full_m,
            "changed_bytes": len(delta_blocks()) * 64 * 1024, "full_runs_s": [round(x, 3) for x in full_s],
            "incremental_runs_s": [round(x, 3) for x in inc_s], "fresh_process_runs_s": [round(x, 3) for x in fresh_s],
            "incremental_bytes_read": st["bytes_read"], "incremental_extents": st["extents"]}


def incremental(work: Path, runs: int) -> dict:
    """A 4 GiB qcow2 (half data) that nothing writes while a sync runs (cbt.QuiescedImage: each
    sync reads it through a private qemu-nbd) fully copied, then 1 % of it changed and synced
    through its bitmap; each measured ``runs`` times (the full copy into a fresh target, the sync
    again from the same frozen view: the same extents each time), medians compared."""
    from activities.transport.cbt import QuiescedImage

    raw = source_4g(work)
    q = work / "inc-4g.qcow2"
    q.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(q)], check=True)
    tracker = QuiescedImage(str(q))
    dst = work / "inc-dst.raw"
    engine = [PY, "-m", "benchmarks.engine", str(q), str(dst), "--src-image", "qcow2", "--dst-file"]
    settle(q)
    full_s = []
    with tracker.freeze(0):
        for i in range(runs + 1):  # the first one an untimed warm-up (see settle)
            fresh_target(dst, 4 * GiB)
            os.sync()
            elapsed = json.loads(timed(engine)["stdout"])["elapsed_s"]
            full_s += [elapsed] if i else []
            print(f"  full copy        {elapsed:.3f} s{'' if i else ' (untimed warm-up)'}", flush=True)
    cmds = [x for pattern, off in delta_blocks() for x in ("-c", f"write -P {pattern} {off} 64k")]
    for i in range(0, len(cmds), 400):
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds[i:i + 400], str(q)], check=True, capture_output=True)
    with tracker.freeze(1) as view:
        fresh_s, inc_s, st = sync_runs([*engine, "--bitmap", view.bitmap], runs)
    tracker.stop()
    return sync_summary(full_s, fresh_s, inc_s, st)


def live(work: Path, runs: int) -> dict:
    """A warm migration's own source: the disk of a running QEMU (qemu-storage-daemon standing in
    for the VM, the same 4 GiB qcow2 as node disk0), frozen per sync by LiveDisk (dirty bitmap,
    fleecing node, NBD export on the daemon's server). The full sync is copied by xms and by
    ``nbdcopy --flush`` from the same export into a fresh file, interleaved; then the guest
    changes 1 % of the disk through its own export and the next sync reads the changes."""
    import nbd

    from activities.transport.live import LiveDisk
    from tests.conftest import qemu_storage_daemon

    d = work / "live"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    q = d / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source_4g(work)), str(q)], check=True)
    dst = work / "live-dst.raw"

    def engine(export: str) -> list[str]:  # each sync's export has its own name
        return [PY, "-m", "benchmarks.engine", export, str(dst), "--dst-file"]

    settle(q)
    with qemu_storage_daemon(q, d) as qsd:
        disk = LiveDisk(str(qsd.qmp), "disk0", d / "run", nbd_socket=str(qsd.guest))
        try:
            full_s, nbdcopy_s = [], []
            with disk.freeze(0) as view:
                def xms() -> None:
                    fresh_target(dst, 4 * GiB)
                    os.sync()
                    full_s.append(json.loads(timed(engine(view.location))["stdout"])["elapsed_s"])

                def nbdcopy() -> None:
                    fresh_target(dst, 4 * GiB)
                    os.sync()
                    nbdcopy_s.append(timed(["nbdcopy", "--flush", "--destination-is-zero", view.location, str(dst)])["wall_s"])

                xms()  # untimed warm-up (see settle)
                full_s.clear()
                for i in range(runs):  # interleaved, each going first in turn
                    for step in (xms, nbdcopy) if i % 2 == 0 else (nbdcopy, xms):
                        step()
                    print(f"  full sync        xms {full_s[-1]:.3f} s, nbdcopy --flush {nbdcopy_s[-1]:.3f} s", flush=True)
            guest = nbd.NBD()
            guest.connect_uri(qsd.guest_uri)
            for pattern, off in delta_blocks():
                guest.pwrite(bytes([pattern]) * (64 * 1024), off)
            guest.flush()
            guest.shutdown()
            with disk.freeze(1) as view:
                fresh_s, inc_s, st = sync_runs([*engine(view.location), "--bitmap", view.bitmap], runs)
        finally:
            disk.stop()
    dst.unlink(missing_ok=True)
    nb = statistics.median(nbdcopy_s)
    return {**sync_summary(full_s, fresh_s, inc_s, st), "nbdcopy_full_s": nb,
            "nbdcopy_full_runs_s": [round(x, 3) for x in nbdcopy_s], "full_ratio_to_nbdcopy": nb / statistics.median(full_s)}


def memory(work: Path) -> dict:
    out = {}
    for label, size, every, length in (("1 GiB", GiB, 64 * MiB, 32 * MiB), ("16 GiB sparse", 16 * GiB, 512 * MiB, 32 * MiB)):
        src = work / f"mem-{label.split()[0]}.raw"
        if not src.exists():
            make_disk(src, size, every, length, seed=7)
        r = bare_engine_file(src, work / "mem-dst.raw", size)
        out[label] = {"peak_rss_mib": r["peak_rss_mib"], "mib_s": r["mib_s"]}
    (work / "mem-dst.raw").unlink(missing_ok=True)
    return out


def qos(work: Path) -> dict:
    src = work / "c0.raw"
    if not src.exists():
        make_disk(src, GiB, 64 * MiB, 32 * MiB, seed=10)
    r = bare_engine_file(src, work / "qos-dst.raw", GiB, ["--qos-bps", str(50 * MiB)])
    return {"limit_mib_s": 50, "measured_mib_s": r["bytes_written"] / MiB / r["copy_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=WORKDIR)
    p.add_argument("--keep-inputs", action="store_true", help="keep the inputs for the next run (~25 GiB)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    p.add_argument("--only", nargs="*", choices=["full", "temporal", "incremental", "live", "memory", "qos"])
    a = p.parse_args()
    ours = a.workdir == WORKDIR or not a.workdir.exists() or not any(a.workdir.iterdir())
    a.workdir.mkdir(parents=True, exist_ok=True)
    for tool in ("nbdcopy", "qemu-img", "qemu-nbd", "qemu-io", "qemu-storage-daemon"):
        if not shutil.which(tool):
            print(f"benchmark: {tool} is missing (make setup installs it)", file=sys.stderr)
            return 1
    todo = a.only or ["full", "temporal", "incremental", "live", "memory", "qos"]
    res: dict = {"machine": {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}}
    steps = {"full": lambda: full_copy(a.workdir, a.runs), "temporal": lambda: through_temporal(a.workdir, a.runs),
             "incremental": lambda: incremental(a.workdir, a.runs), "live": lambda: live(a.workdir, a.runs),
             "memory": lambda: memory(a.workdir),
             "qos": lambda: qos(a.workdir)}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        for k in todo:
            print(f"== {k}", flush=True)
            res[k] = steps[k]()
            print(json.dumps(res[k], indent=1), flush=True)
            a.json.write_text(json.dumps(res, indent=2))  # after every step: a failure later keeps these
    finally:
        if ours and not a.keep_inputs:
            shutil.rmtree(a.workdir, ignore_errors=True)
        else:
            print(f"inputs kept in {a.workdir}")
    print(f"results: {a.json}")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    sys.exit(main())
