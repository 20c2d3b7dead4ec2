"""The worker's image server: one qemu-storage-daemon per process that exports local images for
incremental syncs, so a sync does not start a qemu-nbd of its own.

An incremental sync of a quiesced image copies a few dozen MiB; starting its private qemu-nbd
(setpriv, sh, qemu-nbd's own start-up and image open, the handshake) took 7-10 ms of a ~47 ms
sync, and its exit another ~1 ms. The daemon is started once (on first use) and each sync asks it
over QMP for a read-only node of its image and an NBD export of that node with the sync's dirty
bitmap (~2 ms with the handshake), and removes both afterwards: between syncs the daemon holds no
image open and no lock, as the quiesced-image contract requires (the owner writes then).

Like a private qemu-nbd, the daemon is this process's child, dies with it (``setpriv
--pdeathsig``, from a thread that lives as long as the process: the signal follows the thread that
started the child), and listens only on sockets made here, in a mode-0700 directory. Its QMP
socket and NBD socket are made and listened on before it starts and handed over as fds 3 and 4,
so nothing polls for its start. A daemon that died is started again by the next export; the
handles it served fail (their copies are retried). Full syncs and the extra connections of a large
copy keep private qemu-nbd processes: one export here is served by the daemon's one main loop.
"""

from __future__ import annotations

import atexit
import fcntl
import itertools
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import weakref

import nbd

from activities.transport import nbd as transport
from xms.errors import SourceUnreadable, TransientIOError

QSD = shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"
QMP_TIMEOUT_S = 30.0  # a daemon that does not answer within this is stopped and started anew
_QMP_FD, _NBD_FD = 3, 4
_ROOM = 47  # "/xms-images-<pid>-XXXXXXXX/nbd" in a socket path


class _Daemon:
    """One running qemu-storage-daemon and its QMP connection (used under ImageServer.lock)."""

    def __init__(self) -> None:
        if not shutil.which(QSD):
            raise SourceUnreadable("qemu-storage-daemon is not installed (make setup installs it)")
        _sweep()
        self.dir = tempfile.mkdtemp(prefix=f"xms-images-{os.getpid()}-", dir=transport.socket_dir(_ROOM))
        self.qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.nbd_path = os.path.join(self.dir, "nbd")
        qmp_path = os.path.join(self.dir, "qmp")
        listeners = []
        try:
            for path, backlog in ((qmp_path, 1), (self.nbd_path, 64)):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listeners.append(s)
                s.bind(path)
                s.listen(backlog)
            self.qmp.connect(qmp_path)  # queued until the daemon accepts: its one monitor client
            os.unlink(qmp_path)  # nobody else may ever reach the monitor
            self.qmp.settimeout(QMP_TIMEOUT_S)
            cmd = transport.helper_command([
                QSD, "--chardev", f"socket,id=qmp,fd={_QMP_FD},server=on,wait=off", "--monitor", "chardev=qmp",
                "--nbd-server", f"addr.type=fd,addr.str={_NBD_FD}"], "KILL")
            # the listeners' own numbers may be 3 or 4: hand over copies numbered above both
            high: list[int] = []
            try:
                high += [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in listeners]
                self.exited = threading.Event()
                self.pid = _spawn(cmd, [(high[0], _QMP_FD), (high[1], _NBD_FD)], self.exited)
            finally:
                for fd in high:
                    os.close(fd)
        except BaseException:
            self.qmp.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            for s in listeners:
                s.close()
        self.buf = b""
        self.deleted: set[str] = set()  # exports whose BLOCK_EXPORT_DELETED has arrived, not yet waited for
        self.stopped = False
        self.command("qmp_capabilities", greeting=True)

    @property
    def alive(self) -> bool:
        return not self.stopped and not self.exited.is_set()

    def _read(self) -> dict:
        """The next message; a BLOCK_EXPORT_DELETED event is noted in ``deleted``."""
        while b"\n" not in self.buf:
            chunk = self.qmp.recv(65536)  # OSError (timeout) after QMP_TIMEOUT_S of silence
            if not chunk:
                raise OSError("qemu-storage-daemon closed its monitor")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        m = json.loads(line)
        if m.get("event") == "BLOCK_EXPORT_DELETED":
            self.deleted.add(m.get("data", {}).get("id"))
        return m

    def _failed(self, e: Exception) -> TransientIOError:
        self.stop()
        return TransientIOError(f"the worker's qemu-storage-daemon failed: {e}")

    def command(self, name: str, args: dict | None = None, greeting: bool = False) -> object:
        """Run one QMP command; its error as QmpError. A daemon that died or does not answer is
        stopped: TransientIOError (the next export starts a new one)."""
        try:
            if greeting:
                self._read()  # {"QMP": ...}
            self.qmp.sendall(json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode() + b"\n")
            while "event" in (m := self._read()):
                pass
        except (OSError, ValueError) as e:
            raise self._failed(e) from None
        if "error" in m:
            raise QmpError(m["error"].get("desc", str(m["error"])))
        return m.get("return")

    def until_deleted(self, export_id: str) -> None:
        """Until the export's BLOCK_EXPORT_DELETED has arrived (usually right after block-export-del's
        reply): only then can its node be removed."""
        try:
            while export_id not in self.deleted:
                self._read()  # no command is pending: only events come
        except (OSError, ValueError) as e:
            raise self._failed(e) from None
        self.deleted.discard(export_id)

    def stop(self) -> None:
        """Kill the daemon (it holds nothing that needs flushing: every node is read-only)."""
        if not self.stopped:
            self.stopped = True
            if not self.exited.is_set():  # once reaped, the pid may be another process's
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass
            self.qmp.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class QmpError(Exception):
    pass


def _sweep() -> None:
    """Remove the socket directories of processes that are gone (killed: no exit handler ran)."""
    base = transport.socket_dir(_ROOM)
    for entry in os.listdir(base):
        m = re.fullmatch(r"xms-images-(\d+)-\w+", entry)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
        except PermissionError:  # another user's process
            pass


def _spawn(cmd: list[str], fds: list[tuple[int, int]], exited: threading.Event) -> int:
    """Start ``cmd`` from a thread that lives as long as the daemon (the thread's death is what
    the daemon's pdeathsig follows), reaps it and sets ``exited`` when it has exited."""
    started: list[int | BaseException] = []
    ready = threading.Event()

    def run() -> None:
        try:
            pid = os.posix_spawn(cmd[0], cmd, transport.helper_env(),
                                 file_actions=[(os.POSIX_SPAWN_DUP2, a, b) for a, b in fds])
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            started.append(e)
            ready.set()
            return
        started.append(pid)
        ready.set()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        exited.set()

    threading.Thread(target=run, name="xms-image-server", daemon=True).start()
    ready.wait()
    if isinstance(started[0], BaseException):
        raise SourceUnreadable(f"cannot start qemu-storage-daemon: {started[0]}")
    return started[0]


class ImageServer:
    """Exports local images read-only, each with a dirty bitmap, through one daemon."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # QMP is one conversation; exports are made and removed under it
        self.daemon: _Daemon | None = None
        self.names = itertools.count(1)
        self.io_uring: bool | None = None  # as for private qemu-nbd: known after the first export

    def _running(self) -> _Daemon:
        if self.daemon is None or not self.daemon.alive:
            if self.daemon is not None:
                self.daemon.stop()  # its directory
            self.daemon = None
            try:
                self.daemon = _Daemon()
            except OSError as e:  # no socket directory or sockets here
                raise TransientIOError(f"cannot start the worker's qemu-storage-daemon: {e}") from None
        return self.daemon

    def connect(self, h: nbd.NBD, path: str, fmt: str, bitmap: str) -> None:
        """Export ``path`` with ``bitmap`` and connect ``h`` (meta contexts already added) to it.
        The export lives until release(h), or until ``h`` is dropped."""
        name = f"xms-{next(self.names)}"
        with self.lock:
            d = self._running()
            self._add_node(d, name, path, fmt)
            try:
                d.command("block-export-add", {"type": "nbd", "id": name, "node-name": name, "name": name,
                                               "writable": False, "bitmaps": [bitmap]})
            except QmpError as e:
                self._remove_node(d, name)
                raise SourceUnreadable(f"cannot open {path}: {e}") from None
        h._xms_export = weakref.finalize(h, self._release_later, d, name)
        h._xms_export.atexit = False  # at exit the daemon dies with the process
        h._xms_peer_pid = d.pid  # whose socket serves h (transport.server_socket)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:  # outside the lock: a daemon that hangs in a handshake holds up this sync only
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, transport.SERVER_SNDBUF)
            client.connect(d.nbd_path)
            h.set_export_name(name)
            h.connect_socket(client.detach())
        except (OSError, nbd.Error) as e:
            client.close()  # if libnbd did not take it
            self.release(h)
            if isinstance(e, OSError) or not d.alive:  # its socket is gone or it died: start afresh next time
                with self.lock:
                    d.stop()
                raise TransientIOError(f"the worker's qemu-storage-daemon failed: {e}") from None
            raise SourceUnreadable(f"cannot open {path}: {e.string or e}") from None
        transport.grow_server_send_buffer(h)
        h.set_pread_initialize(False)  # as for a private qemu-nbd (see nbd._start)

    def _add_node(self, d: _Daemon, name: str, path: str, fmt: str) -> None:
        """A read-only node of the image (through io_uring unless this kernel refused it once)."""
        while True:
            aio = "threads" if self.io_uring is False else "io_uring"
            try:
                proto = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
                d.command("blockdev-add", {"driver": fmt, "node-name": name, "read-only": True,
                                           "file": {"driver": proto, "filename": path, "aio": aio}})
                if aio == "io_uring":
                    self.io_uring = True
                return
            except OSError as e:
                raise SourceUnreadable(f"cannot open {path}: {e.strerror}") from None
            except QmpError as e:
                if aio == "io_uring" and self.io_uring is None and "Unable to use io_uring" in str(e):
                    self.io_uring = False  # then once more through the thread pool
                    continue
                raise SourceUnreadable(f"cannot open {path}: {e}") from None

    def _remove_node(self, d: _Daemon, name: str) -> None:
        try:
            d.command("blockdev-del", {"node-name": name})
        except QmpError:
            d.stop()  # a node it would not drop: never leave an image open (a fresh daemon holds none)

    def _remove(self, d: _Daemon, name: str) -> None:
        """Remove the export (dropping any client still on it) and its node, so the image is closed
        and unlocked when this returns."""
        if not d.alive:
            return
        try:
            d.command("block-export-del", {"id": name, "mode": "hard"})
        except QmpError:
            d.stop()
            return
        d.until_deleted(name)
        self._remove_node(d, name)

    def release(self, h: nbd.NBD) -> None:
        """Remove ``h``'s export and node now (``h`` is closed): the image is closed and unlocked
        when this returns."""
        got = h._xms_export.detach()
        if got is not None:
            self._release(*got[2])

    def _release_later(self, d: _Daemon, name: str) -> None:
        """A handle dropped without close(): its finalizer may run anywhere, even in a thread that
        holds the lock in the middle of a QMP exchange, so the removal runs in a thread of its own."""
        threading.Thread(target=self._release, args=(d, name), name="xms-image-release", daemon=True).start()

    def _release(self, d: _Daemon, name: str) -> None:
        with self.lock:
            try:
                self._remove(d, name)
            except TransientIOError:
                pass  # the daemon failed and was killed: it holds no image any more

    def stop(self) -> None:
        with self.lock:
            if self.daemon is not None:
                self.daemon.stop()
                self.daemon = None


SERVER = ImageServer()
atexit.register(SERVER.stop)  # its socket directory; the daemon itself dies with the process
