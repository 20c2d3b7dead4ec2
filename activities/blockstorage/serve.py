"""A private qemu-nbd serving one image on a unix socket in a fresh 0700 directory.

Used by adapters whose volume is not a raw file the copy engine can write directly: the local
store's LUKS qcow2 volumes and a Cinder volume whose active file is a qcow2 overlay (the NFS
driver after a snapshot). One server, ``-e 4`` shared connections, so the engine's parallel
connections write through one process holding the image lock.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xms.errors import TransientIOError

NBD_START_TIMEOUT_S = 15.0
NBD_STOP_TIMEOUT_S = 20.0  # then SIGKILL; a clean stop lets qemu-nbd flush the qcow2 metadata


@contextmanager
def serve_image(image_args: list[str], run_dir: Path | None, *, writable: bool, what: str) -> Iterator[str]:
    """Run ``qemu-nbd IMAGE_ARGS`` and yield its NBD URI once it answers a handshake."""
    run = run_dir if run_dir is not None and len(str(run_dir)) < 80 else None  # sun_path holds ~107 bytes
    sock_dir = Path(tempfile.mkdtemp(prefix="nbd-", dir=run))
    sock = str(sock_dir / "nbd.sock")
    uri = f"nbd+unix:///?socket={sock}"
    argv = ["qemu-nbd", *image_args, "-k", sock, "--discard=unmap", "-e", "4", "--persistent",
            *([] if writable else ["-r"])]
    try:
        with open(sock_dir / "qemu-nbd.log", "w+") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    preexec_fn=die_with_parent)
            try:
                deadline = time.monotonic() + NBD_START_TIMEOUT_S
                while not serving(uri):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        detail = (log.read().strip().splitlines() or ["no output"])[-1]
                        raise TransientIOError(f"qemu-nbd for {what} did not start: {detail}")
                    time.sleep(0.02)
                yield uri
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=NBD_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def serving(uri: str) -> bool:
    """True once qemu-nbd completes an NBD handshake. The socket exists (and even accepts)
    before the image is open and before qemu-nbd handles SIGTERM, so existence is not enough."""
    import nbd  # Debian's libnbd bindings

    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error:
        return False
    h.shutdown()
    return True


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the worker dies, so a SIGKILLed worker leaves
    no qemu-nbd holding the image's lock."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
