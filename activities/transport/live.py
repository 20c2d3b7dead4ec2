"""Changed-block tracking for a live disk: a block node of a running QEMU (or qemu-storage-daemon),
driven over its QMP socket. Same generations and commit rules as ``cbt.ChangeTracker``.

Per sync ``g`` (checked on Debian's qemu 7.2):

* ONE ``transaction`` freezes the point in time: ``block-dirty-bitmap-add xms-<g+1>`` (persistent
  if the node is qcow2, granularity 64 KiB), ``block-dirty-bitmap-disable xms-<g>`` (g >= 1) and
  ``blockdev-backup sync=none`` from the node into a fleecing node ``xms-fleece-<tag>-<g>``: a
  qcow2 file in ``run_dir`` (made by ``qemu-img create``, no backing in its header) opened by
  ``blockdev-add`` with ``backing: <node>``. The backup job inserts a copy-before-write filter
  above the node, so guest writes after the freeze push the old data into the fleece first.
* ``block-export-add type=nbd`` of the fleecing node, read-only, with ``bitmaps: [xms-<g>]``: qemu
  7.2 looks the bitmap up along the exported node's backing chain, so the source node's (disabled)
  bitmap is exported through the overlay as ``qemu:dirty-bitmap:xms-<g>`` unchanged.
* The NBD server is started once per QEMU (``nbd-server-start`` on ``run_dir/nbd.sock``, run_dir
  mode 0700, one run_dir per QEMU instance). QEMU has a single NBD server and 7.2 cannot report
  its address: if one is already running (e.g. started on qemu-storage-daemon's command line),
  pass its socket as ``nbd_socket`` and xms adds its exports to it.

Names are deterministic per node and generation (``<tag>`` is the node name, or a hash if long),
so a retry finds a crashed attempt's backup job and fleece and reuses them: the same point in
time. A retry after an exception (the fleece was torn down) freezes again and, in the same
transaction, merges ``xms-<g+1>`` into ``xms-<g>`` and clears it, so the new point in time is
read exactly. Commit (normal exit) removes ``xms-<g>`` after the export, job and fleece are gone,
and only if the backup job was still running (a failed job means the fleece stopped protecting
the point in time). Older abandoned ``xms-<k>`` (k < g) are merged into ``xms-<g>`` first.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from activities.transport.cbt import PREFIX, FrozenView, bitmap_name
from xms.errors import ChangeTrackingLost, InvalidRequest, SourceUnreadable, TransientIOError, XmsError

GRANULARITY = 64 * 1024
WAIT = 30.0  # seconds for QMP connect and for exports/jobs to go away
NODE_NAME = r"[A-Za-z][A-Za-z0-9_.-]{0,30}"  # what QEMU accepts as a node or device name


def _gen(bitmap: str) -> int:
    return int(bitmap.removeprefix(PREFIX))


def parse_qmp_uri(uri: str) -> tuple[str, str, str | None]:
    """``qmp+unix:///ABS/PATH/qmp.sock?node=NODE[&nbd-socket=/ABS/PATH]`` -> (QMP socket, node,
    the socket of an NBD server the QEMU already runs, if any)."""
    form = "expected qmp+unix:///ABSOLUTE/PATH/qmp.sock?node=NODE[&nbd-socket=/ABSOLUTE/PATH]"
    u = urlsplit(uri)
    q = parse_qs(u.query, keep_blank_values=True)
    if u.scheme != "qmp+unix" or u.netloc or not u.path.startswith("/") or u.fragment:
        raise InvalidRequest(f"bad live disk source {uri!r}; {form}")
    if not set(q) <= {"node", "nbd-socket"} or any(len(v) != 1 for v in q.values()):
        raise InvalidRequest(f"bad live disk source {uri!r}: unknown or repeated parameter; {form}")
    if "node" not in q or not re.fullmatch(NODE_NAME, q["node"][0]):
        raise InvalidRequest(f"bad live disk source {uri!r}: one node=NAME (a QEMU node or device name) is needed; {form}")
    nbd_socket = q.get("nbd-socket", [None])[0]
    if nbd_socket is not None and not nbd_socket.startswith("/"):
        raise InvalidRequest(f"bad live disk source {uri!r}: nbd-socket must be an absolute path; {form}")
    return u.path, q["node"][0], nbd_socket


def live_disk(uri: str, run_dir: Path) -> "LiveDisk":
    sock, node, nbd_socket = parse_qmp_uri(uri)
    return LiveDisk(sock, node, Path(run_dir) / f"qmp-{hashlib.sha1(sock.encode()).hexdigest()[:12]}", nbd_socket)


class LiveDisk:
    """A ``cbt.ChangeTracker`` for a block node of a running QEMU, reached over QMP."""

    def __init__(self, qmp_socket: str, node: str, run_dir: Path, nbd_socket: str | None = None):
        self.socket, self.node, self.run_dir = qmp_socket, node, Path(run_dir)
        self.nbd_socket = nbd_socket or str(self.run_dir / "nbd.sock")
        self.own_server = nbd_socket is None
        self.tag = node if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,11}", node) else "n" + hashlib.sha1(node.encode()).hexdigest()[:8]

    # ------------------------------------------------------------------ names
    def _fleece(self, g: int) -> str:
        return f"xms-fleece-{self.tag}-{g}"

    def _job(self, g: int) -> str:
        return f"xms-backup-{self.tag}-{g}"

    def _export(self, g: int) -> str:
        return f"xms-exp-{self.tag}-{g}"

    def _file(self, g: int) -> Path:
        return self.run_dir / f"{self._fleece(g)}.qcow2"

    def _ours(self, name: str) -> int | None:
        """The generation of one of this node's xms exports/jobs/fleece nodes, else None."""
        m = re.fullmatch(rf"xms-(?:fleece|backup|exp)-{re.escape(self.tag)}-(\d+)", name)
        return int(m.group(1)) if m else None

    # ------------------------------------------------------------------ QMP plumbing
    def qmp(self, cmd: str, args: dict | None = None):
        """One QMP command on a short-lived connection (for callers and tests)."""
        return self._run(lambda c: c.execute(cmd, args))

    def _run(self, fn):
        async def go():
            c = QMPClient("xms")
            try:
                await asyncio.wait_for(c.connect(self.socket), WAIT)
            except (ConnectError, OSError, asyncio.TimeoutError) as e:
                cause = getattr(e, "exc", e)
                if isinstance(cause, (FileNotFoundError, ConnectionRefusedError)):
                    raise SourceUnreadable(f"no QEMU answers on QMP socket {self.socket}: {cause}") from None
                raise TransientIOError(f"cannot connect to QMP socket {self.socket}: {cause or 'timed out'}") from None
            try:
                return await asyncio.wait_for(fn(c), 10 * WAIT)
            except asyncio.TimeoutError:
                raise TransientIOError(f"QEMU at {self.socket} did not answer within {10 * WAIT:.0f}s") from None
            except ExecuteError as e:
                cmd, desc = e.sent.get("execute", "?"), str(e)
                if e.error_class == "DeviceNotFound" or f"'{self.node}' not found" in desc:
                    raise SourceUnreadable(f"live disk {self.node} on {self.socket}: {desc}") from None
                raise TransientIOError(f"QMP {cmd} on {self.socket}: {desc}") from None
            except QMPError as e:
                raise TransientIOError(f"QMP session with {self.socket} failed: {e}") from None
            finally:
                try:
                    await c.disconnect()
                except (QMPError, OSError, EOFError):
                    pass  # the session is over either way (e.g. after "quit")

        return asyncio.run(go())

    async def _info(self, c: QMPClient) -> dict:
        """The node's entry in query-named-block-nodes (a device name is resolved to its node)."""
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes", {"flat": True})}
        if self.node not in nodes:
            dev = [b for b in await c.execute("query-block") if b["device"] == self.node and "inserted" in b]
            if not dev:
                raise SourceUnreadable(f"live disk {self.node}: no such node or device on {self.socket}")
            return nodes[dev[0]["inserted"]["node-name"]]
        return nodes[self.node]

    async def _bitmaps(self, c: QMPClient) -> dict[str, bool]:
        info = await self._info(c)
        return {b["name"]: b["recording"] for b in info.get("dirty-bitmaps", [])
                if re.fullmatch(rf"{PREFIX}\d+", b.get("name", ""))}

    async def _leftovers(self, c: QMPClient) -> tuple[dict, dict, dict]:
        """(exports, jobs, fleece nodes) of this node, each {name: generation}."""
        found = []
        for q, key, args in (("query-block-exports", "id", None), ("query-block-jobs", "device", None),
                             ("query-named-block-nodes", "node-name", {"flat": True})):
            found.append({x[key]: g for x in await c.execute(q, args) if (g := self._ours(x[key])) is not None})
        return found[0], found[1], found[2]

    async def _until_gone(self, c: QMPClient, query: str, key: str, name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while any(x[key] == name for x in await c.execute(query)):
            if loop.time() > deadline:
                raise TransientIOError(f"{name} is still present on {self.socket} after {WAIT:.0f}s")
            await asyncio.sleep(0.02)

    async def _drop(self, c: QMPClient, g: int) -> None:
        """Remove generation g's export, backup job and fleece (whichever exist)."""
        exports, jobs, nodes = await self._leftovers(c)
        if self._export(g) in exports:
            await c.execute("block-export-del", {"id": self._export(g), "mode": "hard"})
            await self._until_gone(c, "query-block-exports", "id", self._export(g))
        if self._job(g) in jobs:
            await c.execute("block-job-cancel", {"device": self._job(g)})
            await self._until_gone(c, "query-block-jobs", "device", self._job(g))
        if self._fleece(g) in nodes:
            await c.execute("blockdev-del", {"node-name": self._fleece(g)})
        self._file(g).unlink(missing_ok=True)

    # ------------------------------------------------------------------ public API
    def size(self) -> int:
        return self._run(lambda c: self._info(c))["image"]["virtual-size"]

    def bitmaps(self) -> dict[str, bool]:
        """name -> recording, for xms's bitmaps on the node."""
        return self._run(self._bitmaps)

    @contextmanager
    def freeze(self, generation: int) -> Iterator[FrozenView | None]:
        g = generation
        view = self._run(lambda c: self._prepare(c, g))
        if view is None:
            yield None  # committed by an earlier attempt
            return
        try:
            yield view
        except BaseException:
            try:
                self._run(lambda c: self._drop(c, g))
            except XmsError:
                pass  # best effort; the next attempt cleans up what is left
            raise
        self._run(lambda c: self._commit(c, g))

    async def _prepare(self, c: QMPClient, g: int) -> FrozenView | None:
        info = await self._info(c)
        node, have = info["node-name"], await self._bitmaps(c)
        cur, nxt = bitmap_name(g), bitmap_name(g + 1)
        exports, jobs, nodes = await self._leftovers(c)
        for other in {*exports.values(), *jobs.values(), *nodes.values()} - {g}:
            await self._drop(c, other)  # abandoned generations would keep their bitmaps busy
        if not (self._job(g) in jobs and self._fleece(g) in nodes):  # else: reuse a crashed attempt's freeze
            await self._drop(c, g)
            if g == 0:  # a full sync restarts tracking: older bitmaps are moot
                for stale in set(have) - {nxt}:
                    await c.execute("block-dirty-bitmap-remove", {"node": node, "name": stale})
                actions = [("block-dirty-bitmap-clear", {"node": node, "name": nxt})] if nxt in have else [
                    ("block-dirty-bitmap-add", {"node": node, "name": nxt, "granularity": GRANULARITY,
                                                "persistent": info["drv"] == "qcow2"})]
            else:
                if cur not in have:
                    if nxt in have:
                        return None
                    if not any(_gen(b) < g for b in have):
                        raise ChangeTrackingLost(f"live disk {self.node}: no xms dirty bitmap is left (change "
                                                 "tracking was reset); a full sync is needed")
                    # earlier generations failed before freezing: their (recording) bitmaps carry on as
                    # this one's; while both record, no write can fall between them
                    await c.execute("block-dirty-bitmap-add", {"node": node, "name": cur, "granularity": GRANULARITY,
                                                               "persistent": info["drv"] == "qcow2"})
                for old in sorted((b for b in have if _gen(b) < g), key=_gen):
                    await c.execute("block-dirty-bitmap-merge", {"node": node, "target": cur, "bitmaps": [old]})
                    await c.execute("block-dirty-bitmap-remove", {"node": node, "name": old})
                if nxt in have:  # an earlier attempt rotated, then failed: fold its changes back in
                    actions = [("block-dirty-bitmap-merge", {"node": node, "target": cur, "bitmaps": [nxt]}),
                               ("block-dirty-bitmap-clear", {"node": node, "name": nxt})]
                else:
                    actions = [("block-dirty-bitmap-add", {"node": node, "name": nxt, "granularity": GRANULARITY,
                                                           "persistent": info["drv"] == "qcow2"}),
                               ("block-dirty-bitmap-disable", {"node": node, "name": cur})]
            await self._add_fleece(c, g, node, info["image"]["virtual-size"])
            actions.append(("blockdev-backup", {"device": node, "target": self._fleece(g), "sync": "none",
                                                "job-id": self._job(g)}))
            await c.execute("transaction", {"actions": [{"type": t, "data": d} for t, d in actions]})
        await self._start_server(c)
        if self._export(g) not in exports:
            await c.execute("block-export-add", {
                "type": "nbd", "id": self._export(g), "node-name": self._fleece(g), "name": f"xms-{self.tag}-{g}",
                "writable": False, **({"bitmaps": [cur]} if g else {})})
        st = self._file(g).stat()  # a reused freeze keeps its fleece file; a new one makes a new file
        return FrozenView(f"nbd+unix:///xms-{self.tag}-{g}?socket={self.nbd_socket}", "nbd", "raw",
                          cur if g else None, g, freeze_id=f"{st.st_ino}-{st.st_ctime_ns}")

    async def _add_fleece(self, c: QMPClient, g: int, node: str, size: int) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self._file(g)), str(size)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise TransientIOError(f"cannot create fleecing image {self._file(g)}: {r.stderr.strip()}")
        await c.execute("blockdev-add", {
            "driver": "qcow2", "node-name": self._fleece(g), "backing": node,
            "file": {"driver": "file", "filename": str(self._file(g))}})

    async def _start_server(self, c: QMPClient) -> None:
        if self.own_server:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.run_dir.chmod(0o700)
        try:
            await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.nbd_socket}}})
        except ExecuteError as e:
            if "already running" not in str(e):
                raise
            if not Path(self.nbd_socket).is_socket():
                raise SourceUnreadable(f"QEMU at {self.socket} already runs an NBD server elsewhere; pass its "
                                       "socket as nbd_socket") from None

    async def _commit(self, c: QMPClient, g: int) -> None:
        job = [j for j in await c.execute("query-block-jobs") if j["device"] == self._job(g)]
        intact = bool(job) and job[0]["status"] == "running"
        await self._drop(c, g)
        if not intact:
            raise TransientIOError(f"live disk {self.node}: the fleecing job of sync {g} ended before the copy "
                                   "finished, so the copy may mix points in time; retry the sync")
        if g:
            await c.execute("block-dirty-bitmap-remove", {"node": (await self._info(c))["node-name"],
                                                          "name": bitmap_name(g)})

    def stop(self) -> None:
        """Remove every xms bitmap, export, backup job and fleece of this node. Idempotent."""
        async def go(c: QMPClient) -> None:
            exports, jobs, nodes = await self._leftovers(c)
            for g in {*exports.values(), *jobs.values(), *nodes.values()}:
                await self._drop(c, g)
            node = (await self._info(c))["node-name"]
            for name in await self._bitmaps(c):
                await c.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
            if self.own_server and Path(self.nbd_socket).is_socket() and not any(
                    e["type"] == "nbd" for e in await c.execute("query-block-exports")):
                await c.execute("nbd-server-stop")
        self._run(go)
        for f in self.run_dir.glob(f"xms-fleece-{self.tag}-*.qcow2"):
            f.unlink(missing_ok=True)

    def power_off(self) -> None:
        """Ask QEMU to quit."""
        self._run(lambda c: c.execute("quit"))

    def pause(self) -> str:
        """PowerOffSource for a live VM: stop its vCPUs (QMP ``stop``), so the guest writes nothing
        after the final delta's freeze while the block layer stays readable. A
        qemu-storage-daemon has no vCPUs: its writers are outside QEMU, nothing to pause."""
        return self._vcpus("stop", "paused")

    def resume(self) -> str:
        """Undo ``pause`` (QMP ``cont``) when a cutover is rolled back to Ready."""
        return self._vcpus("cont", "resumed")

    def _vcpus(self, command: str, done: str) -> str:
        async def go(c: QMPClient) -> str:
            try:
                await c.execute(command)
                return f"{done} the VM behind {self.socket} (QMP {command})"
            except ExecuteError as e:
                if e.error_class == "CommandNotFound":
                    return f"{self.socket} has no vCPUs (qemu-storage-daemon); nothing {done}"
                raise

        return self._run(go)
