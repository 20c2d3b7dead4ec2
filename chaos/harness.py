"""What the chaos scenarios stand on: the project's own stack (tests/conftest.py's ``Stack``),
fault tools that are real processes and real filesystems, the history and status readers, and
the leak checks run after every scenario.

Every wait here has a deadline; polling is a condition wait, never a sleep standing in for one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from activities.transport.nbd import readlink
from tests.conftest import (
    Stack,
    raw_sha256,
    sha256_file,
    tail_is_zero,
    write_test_config,
)
from workers.devserver import DevServer, free_port
from xms.models import MiB

HELPER_COMMS = {"qemu-nbd", "nbdkit", "qemu-img", "qemu-io", "qemu-storage-d"}
PROCESS_GRACE_S = 30.0  # a worker's helpers may take this long to notice their client is gone


class Hung(Exception):
    """A bounded wait ran out: the scenario did not reach the state it waited for."""


# --------------------------------------------------------------------------- the stack


def write_chaos_config(path: Path, tiny_backend: Path) -> Path:
    """tests/conftest.py's config (shipped types, ``throttled-ssd`` at 48 MiB/s, hooks) plus a
    ``tiny-ssd`` type whose backend is ``tiny_backend`` (a small loop-mounted filesystem)."""
    write_test_config(path)
    cfg = yaml.safe_load(path.read_text())
    cfg["backends"]["tiny"] = {"path": str(tiny_backend), "availability_zone": "zone-a"}
    cfg["volume_types"]["tiny-ssd"] = {"backend": "tiny", "description": "chaos: a backend that fills up",
                                       "qos": {"write_bytes_sec": 0, "write_iops_sec": 0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_chaos_stack(data: Path, tiny_backend: Path) -> Stack:
    """Like tests/conftest.py's ``start_stack`` (dev server on free ports, its SQLite file in
    ``data``, a worker subprocess in its own session), with the chaos config."""
    data.mkdir(parents=True, exist_ok=True)
    cfg = write_chaos_config(data / "config.yaml", tiny_backend)
    server = DevServer(host="127.0.0.1", port=free_port(), ui_port=free_port(), db_file=data / "temporal.db",
                       log_file=data / "temporal.log").start(timeout=120)
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ, "XMS_DATA_DIR": str(data), "XMS_CONFIG": str(cfg),
        "XMS_TEMPORAL_ADDRESS": server.address, "XMS_UI_PORT": str(server.ui_port),
        "XMS_HOST_QUEUE": f"xms-host-chaos-{os.getpid()}", "XMS_LOG_FORMAT": "json",
        "PYTHONPATH": str(root),
    }
    for k in ("XMS_PAYLOAD_KEY", "XMS_FAULTS", "XMS_TARGET"):
        env.pop(k, None)
    st = Stack(data_dir=data, env=env, server=server)
    st.start_worker()
    return st


# --------------------------------------------------------------------------- sources and faults


@dataclass
class Nbdkit:
    """nbdkit serving a raw file on a unix socket, optionally through filters: a real NBD server
    whose faults (error, delay filters) and death (SIGKILL) the scenarios control."""

    file: Path
    sock: Path
    filters: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    log: Path | None = None
    proc: subprocess.Popen | None = None
    plugin: list[str] = field(default_factory=list)  # another plugin and its parameters, instead of file=

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self, timeout: float = 60) -> Nbdkit:
        self.sock.unlink(missing_ok=True)
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock),
                *(f"--filter={f}" for f in self.filters), *(self.plugin or ["file", f"file={self.file}"]), *self.params]
        log = open(self.log or os.devnull, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while not _nbd_answers(self.uri):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited with {self.proc.returncode}: {' '.join(argv)}")
            if time.monotonic() > deadline:
                raise Hung(f"nbdkit did not answer on {self.sock} within {timeout}s")
            time.sleep(0.05)  # readiness poll with a deadline
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, its socket file stays behind (refused)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.sock.unlink(missing_ok=True)


def _nbd_answers(uri: str) -> bool:
    import nbd

    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.shutdown()
        return True
    except nbd.Error:
        return False


@dataclass
class LoopFs:
    """A small ext4 filesystem in a file, loop-mounted (root only): a target that fills up."""

    image: Path
    mountpoint: Path
    size: int

    def mount(self) -> LoopFs:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)])
        _run(["mount", "-o", "loop", str(self.image), str(self.mountpoint)])
        return self

    def used_bytes(self) -> int:
        s = os.statvfs(self.mountpoint)
        return (s.f_blocks - s.f_bfree) * s.f_frsize

    def umount(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True, timeout=60)
        self.image.unlink(missing_ok=True)


def _run(argv: list[str], timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def make_disk(path: Path, size: int, regions: list[tuple[int, int]], fmt: str = "raw", seed: int = 0) -> Path:
    from xms.demo import make_disk as _make

    return _make(path, size, regions, fmt=fmt, seed=seed)


def qemu_io(image: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, str(image)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or "error" in r.stdout.lower():
        raise RuntimeError(f"qemu-io {cmds} failed: {r.stdout}{r.stderr}")


def xms_bitmaps(image: Path) -> list[str]:
    out = _run(["qemu-img", "info", "-U", "--output=json", str(image)])
    found = json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return sorted(b["name"] for b in found if b["name"].startswith("xms-"))


def source_sha256(image: Path, scratch: Path) -> tuple[str, int]:
    return raw_sha256(image, scratch)


# --------------------------------------------------------------------------- the harness


@dataclass
class Harness:
    root: Path
    log: Callable[[str], None] = print
    stack: Stack | None = None
    client: Any = None
    tiny: LoopFs | None = None
    worker_sessions: set[int] = field(default_factory=set)
    store_: Any = None
    reported: set[str] = field(default_factory=set)  # host-wide leaks already reported once

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def src(self) -> Path:
        return self.root / "src"

    async def start(self) -> None:
        from xms.client import connect

        self.src.mkdir(parents=True, exist_ok=True)
        self.tiny = LoopFs(self.root / "tiny.ext4", self.root / "tiny", 64 * MiB)
        self.tiny.mount()
        self.stack = await asyncio.to_thread(start_chaos_stack, self.data, self.tiny.mountpoint)
        self.worker_sessions.add(self.stack.worker.pid)
        self.client = await connect(self.stack.settings)
        await self.wait(self._worker_ready, 120, "the worker to register XmsPhase")

    async def _worker_ready(self) -> bool:
        from xms.client import phase_indexed

        return await phase_indexed(self.client)

    async def close(self) -> None:
        st = self.stack
        if st is not None:
            st.stop_worker()
            if st.worker is not None and st.worker.poll() is None:
                st.kill_worker()
            st.server.stop()
        for sid in self.worker_sessions:  # nothing of ours outlives the harness
            for pid, _ in session_processes(sid):
                _kill(pid)
        if self.tiny is not None:
            self.tiny.umount()

    def store(self):
        if self.store_ is None:
            self.store_ = self.stack.store()
        return self.store_

    # ------------------------------------------------------------------ waiting

    async def wait(self, pred: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.3):
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            try:
                v = await asyncio.wait_for(pred(), max(1.0, min(30.0, deadline - time.monotonic())))
            except Exception as e:  # the server or worker may be down (or slow to answer): keep polling
                v, last = None, e
            if v:
                return v
            if time.monotonic() > deadline:
                why = f" (last error: {type(last).__name__}: {last})" if last else ""
                raise Hung(f"timed out after {timeout:.0f}s waiting for {what}{why}")
            await asyncio.sleep(interval)  # poll interval of a condition wait with a deadline

    async def view(self, name: str):
        from xms.client import view

        return await view(self.client, name)

    async def wait_view(self, name: str, pred, timeout: float, what: str, interval: float = 0.3):
        async def check():
            v = await self.view(name)
            return v if pred(v) else None

        return await self.wait(check, timeout, f"{name}: {what}", interval)

    async def execution_status(self, name: str) -> str:
        desc = await self.client.get_workflow_handle(name).describe()
        return desc.status.name

    async def wait_closed(self, name: str, timeout: float):
        """Wait until the workflow is no longer running; return its final view."""
        async def closed():
            s = await self.execution_status(name)
            return s if s != "RUNNING" else None

        await self.wait(closed, timeout, f"{name} to finish")
        return await self.wait(lambda: self.view(name), 120, f"{name}'s final status")

    async def terminate(self, name: str, why: str) -> None:
        try:
            await self.client.get_workflow_handle(name).terminate(reason=f"chaos: {why}")
        except Exception:
            pass

    # ------------------------------------------------------------------ requests

    def request(self, name: str, disks: list[str], **kw):
        from xms.client import build_request

        kw.setdefault("project", "chaos")
        kw.setdefault("volume_type", "standard-ssd")
        return build_request(name=name, disks=disks, **kw)

    async def migrate(self, name: str, disks: list[str], **kw):
        """Submit and wait for admission (quota reserved), as ``xms migrate`` does."""
        from xms.client import submit

        return await submit(self.client, self.stack.settings, self.request(name, disks, **kw))

    async def start_without_admission(self, name: str, disks: list[str], **kw) -> None:
        """Start the workflow and return at once (``xms migrate`` would wait for admission)."""
        from workflows.migration import MigrationWorkflow
        from xms.client import phase_indexed
        from xms.models import MigrationInput

        req = self.request(name, disks, **kw)
        await self.client.start_workflow(
            MigrationWorkflow.run, MigrationInput(request=req, index_phase=await phase_indexed(self.client)),
            id=name, task_queue=self.stack.settings.task_queue)

    async def cancel(self, name: str) -> None:
        await self.client.get_workflow_handle(name).cancel()

    async def sync_now(self, name: str) -> None:
        from workflows.migration import MigrationWorkflow

        await self.client.get_workflow_handle(name).signal(MigrationWorkflow.sync_now)

    async def cutover(self, name: str):
        from xms.client import cutover

        return await cutover(self.client, name)

    async def activity_attempts(self, name: str) -> dict[str, dict]:
        return await activity_attempts(self.client.get_workflow_handle(name))

    async def pending_copy(self, name: str) -> list[dict]:
        """Pending copy_disk activities: attempt and the last failure's type, from describe."""
        desc = await self.client.get_workflow_handle(name).describe()
        out = []
        for pa in desc.raw_description.pending_activities:
            if pa.activity_type.name == "copy_disk":
                f = pa.last_failure
                out.append({"attempt": pa.attempt, "failure": f.application_failure_info.type if f.message else "",
                            "message": f.message})
        return out

    # ------------------------------------------------------------------ faults

    def kill_worker(self) -> int:
        """SIGKILL the worker process alone (not its process group): whatever it started must
        go away by itself. Returns the killed pid."""
        w = self.stack.worker
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
        return w.pid

    def start_worker(self) -> None:
        self.stack.start_worker()
        self.worker_sessions.add(self.stack.worker.pid)

    def restart_server(self) -> None:
        """SIGKILL the Temporal dev server, start it again on the same port and SQLite file."""
        srv = self.stack.server
        srv.stop(sig=signal.SIGKILL)
        srv.start(timeout=120)

    def hold_store_lock(self) -> sqlite3.Connection:
        """Take the store database's write lock (BEGIN IMMEDIATE) as another store user would."""
        con = sqlite3.connect(self.data / "store.db", timeout=30, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        return con

    # ------------------------------------------------------------------ checks

    def target_matches(self, volume_id: str, want: str, size: int) -> bool:
        path = Path(self.store().get_volume(volume_id).path)
        return sha256_file(path, size) == want and tail_is_zero(path, size)

    async def leaks(self, name: str, project: str, *, volumes_expected: int,
                    bitmap_sources: list[Path] = ()) -> list[str]:
        return await asyncio.to_thread(self._leaks, name, project, volumes_expected, list(bitmap_sources))

    def _leaks(self, name: str, project: str, volumes_expected: int, bitmap_sources: list[Path]) -> list[str]:
        found: list[str] = []
        store = self.store()
        vols = store.list_volumes(migration=name)
        if len(vols) != volumes_expected:
            found.append(f"volumes: {name} has {len(vols)} volume(s), expected {volumes_expected}")
        for key, q in store.quota(project).quotas.items():
            if q.reserved:
                found.append(f"quota: project {project} still has {q.reserved} {key} reserved")
        found += self.reservation_leaks(name, keep=volumes_expected > 0)
        found += self._global_leaks()
        for img in bitmap_sources:
            if left := xms_bitmaps(img):
                found.append(f"bitmaps: {img.name} still carries {', '.join(left)}")
        return found

    async def global_leaks(self) -> list[str]:
        """Host-wide leaks (files, processes, sockets) not reported yet: run after every scenario,
        so that one left by a scenario that ended early is charged to it, and to it only."""
        return await asyncio.to_thread(self._global_leaks)

    def _global_leaks(self) -> list[str]:
        new = [x for x in self.orphan_files() + self.process_leaks() + self.socket_leaks() if x not in self.reported]
        self.reported.update(new)
        return new

    def reservation_leaks(self, name: str, keep: bool) -> list[str]:
        with sqlite3.connect(f"file:{self.data / 'store.db'}?mode=ro", uri=True, timeout=30) as con:
            unconsumed = con.execute(
                "SELECT COUNT(*) FROM reservation_items i JOIN reservations r ON r.id = i.reservation_id "
                "WHERE r.migration = ? AND i.consumed = 0", (name,)).fetchone()[0]
            rows = con.execute("SELECT COUNT(*) FROM reservations WHERE migration = ?", (name,)).fetchone()[0]
        out = []
        if unconsumed:
            out.append(f"reservations: {name} holds {unconsumed} unconsumed reservation item(s)")
        if rows and not keep:
            out.append(f"reservations: {name} (not completed) still has its reservation row")
        return out

    def orphan_files(self) -> list[str]:
        """Volume, snapshot and key files that no live row of the store names."""
        store = self.store()
        with sqlite3.connect(f"file:{self.data / 'store.db'}?mode=ro", uri=True, timeout=30) as con:
            live = {r[0] for r in con.execute("SELECT path FROM volumes WHERE status != 'deleted'")}
            live |= {r[0] for r in con.execute("SELECT path FROM snapshots")}
            ids = {r[0] for r in con.execute("SELECT id FROM volumes WHERE status != 'deleted'")}
        out = []
        for backend in store.config.backends:
            base = store.config.backend_dir(backend, self.data)
            for sub in ("volumes", "snapshots"):
                d = base / sub
                for p in sorted(d.iterdir()) if d.is_dir() else []:
                    if str(p) not in live:
                        out.append(f"files: {p} belongs to no volume or snapshot")
        keys = self.data / "keys"
        for p in sorted(keys.iterdir()) if keys.is_dir() else []:
            if p.name.removesuffix(".key") not in ids:
                out.append(f"files: key {p.name} belongs to no volume")
        return out

    def process_leaks(self) -> list[str]:
        """Processes started by a worker (same session) other than the running worker itself, and
        NBD helpers that name the data dir, that are still alive after a grace period."""
        live_worker = self.stack.worker.pid if self.stack.worker and self.stack.worker.poll() is None else None

        def strays() -> list[tuple[int, str]]:
            out = []
            for sid in self.worker_sessions:
                out += [(pid, what) for pid, what in session_processes(sid)
                        if pid != live_worker and not idle_image_server(pid, live_worker)]
            out += [(pid, what) for pid, what in helper_processes(str(self.data)) if (pid, what) not in out]
            return out

        deadline = time.monotonic() + PROCESS_GRACE_S
        left = strays()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)  # poll interval: helpers exit once they notice their client is gone
            left = strays()
        for pid, what in left:
            self.log(f"chaos: leaked {what} pid {pid}: {describe_process(pid)}")
            _kill(pid)  # report it once, do not let it spill into the next scenario
        return [f"process: {what} (pid {pid}) outlived its migration" for pid, what in left]

    def socket_leaks(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.data):
            d = Path(dirpath)
            if d.parent == self.data / "run" and d.name.startswith("nbd-"):
                out.append(f"sockets: private NBD directory {d} left")
            for f in filenames:
                p = d / f
                try:
                    mode = os.lstat(p).st_mode
                except FileNotFoundError:
                    continue
                if stat.S_ISSOCK(mode):
                    out.append(f"sockets: {p} left")
                elif "xms-fleece" in f:
                    out.append(f"files: fleecing overlay {p} left")
        return out

    async def running_workflows(self) -> list[str]:
        names = []
        async for w in self.client.list_workflows("ExecutionStatus='Running'"):
            names.append(w.id)
        return names


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, session, parent) of a live process; None if gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie holds nothing; its parent reaps it
    return comm, int(fields[3]), int(fields[1])  # state ppid pgrp session


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def session_processes(sid: int) -> list[tuple[int, str]]:
    out = []
    for pid in _pids():
        st = _proc_stat(pid)
        if st and st[1] == sid:
            out.append((pid, st[0]))
    return out


def helper_processes(needle: str) -> list[tuple[int, str]]:
    out = []
    for pid in _pids():
        st = _proc_stat(pid)
        if st and st[0] in HELPER_COMMS and needle in _cmdline(pid):
            out.append((pid, st[0]))
    return out


def idle_image_server(pid: int, worker: int | None) -> bool:
    """The running worker's own image server (activities/transport/imageserver.py: a
    qemu-storage-daemon that lives as long as the worker) holding no image: between syncs it has
    no file open beyond the worker's stdio, only sockets, eventfds and io_uring."""
    st = _proc_stat(pid)
    if worker is None or not st or not st[0].startswith("qemu-storage-d") or st[2] != worker:
        return False
    try:
        fds = [fd for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2]
    except OSError:
        return False
    links = [readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]  # one closed meanwhile reads as ""
    return not any(link.startswith("/") and not link.startswith("/dev/") for link in links)


def describe_process(pid: int) -> str:
    """cmdline, parent, state and open files of a process: enough to tell why it is still there."""
    try:
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        fds = []
        for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            try:
                fds.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
            except OSError:
                pass
        return (f"cmdline={_cmdline(pid)!r} ppid={status.get('PPid', '?').strip()} "
                f"state={status.get('State', '?').strip()} fds=[{', '.join(fds)}]")
    except OSError as e:
        return f"gone ({e})"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- history


async def activity_attempts(handle) -> dict[str, dict]:
    """Per activity type, from the workflow's history: the highest attempt that started, whether
    any attempt was a retry, and the failures recorded (type, non_retryable, attempt).

    Temporal records one ActivityTaskStarted per activity (the last attempt, with the previous
    attempt's failure in ``last_failure``) and one ActivityTaskFailed when it gives up."""
    from temporalio.api.enums.v1 import EventType

    hist = await handle.fetch_history()
    scheduled: dict[int, str] = {}
    started_attempt: dict[int, int] = {}
    out: dict[str, dict] = {}
    for ev in hist.events:
        t = ev.event_type
        if t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            a = ev.activity_task_started_event_attributes
            name = scheduled.get(a.scheduled_event_id, "?")
            started_attempt[a.scheduled_event_id] = a.attempt
            o = out.setdefault(name, {"max_attempt": 0, "retried_after": [], "failures": []})
            o["max_attempt"] = max(o["max_attempt"], a.attempt)
            if a.attempt > 1 and a.last_failure.message:
                o["retried_after"].append({"type": a.last_failure.application_failure_info.type,
                                           "message": a.last_failure.message})
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            a = ev.activity_task_failed_event_attributes
            name = scheduled.get(a.scheduled_event_id, "?")
            info = a.failure.application_failure_info
            o = out.setdefault(name, {"max_attempt": 0, "retried_after": [], "failures": []})
            o["failures"].append({"type": info.type, "non_retryable": info.non_retryable,
                                  "attempt": started_attempt.get(a.scheduled_event_id, 0),
                                  "message": a.failure.message, "retry_state": int(a.retry_state)})
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    return h.hexdigest()
