"""`xms server` (embedded stack) and `xms demo`, run as real processes on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import ROOT, wait_until
from workers.devserver import free_port

pytestmark = pytest.mark.timeout(300)


def _env(tmp_path, **extra) -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(ROOT), "XMS_DATA_DIR": str(tmp_path / "data"),
        "XMS_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}", "XMS_UI_PORT": str(free_port()),
        "XMS_METRICS_PORT": str(free_port()), "XMS_HOST_QUEUE": f"xms-host-srv-{os.getpid()}", **extra,
    }


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def test_server_starts_refuses_twice_and_stops_everything(tmp_path):
    env = _env(tmp_path)
    port = env["XMS_TEMPORAL_ADDRESS"].rsplit(":", 1)[1]
    first = subprocess.Popen([sys.executable, "-m", "xms", "server"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = wait_until(lambda: _get(f"http://127.0.0.1:{env['XMS_METRICS_PORT']}/metrics"), 60, "metrics")
        assert "xms_bytes_copied_total" in metrics and "xms_activity_failures_total" in metrics
        # xms_migrations{phase} is filled from Temporal visibility (the XmsPhase search attribute)
        wait_until(lambda: 'xms_migrations{phase="Completed"} 0.0' in (_get(
            f"http://127.0.0.1:{env['XMS_METRICS_PORT']}/metrics") or ""), 60, "xms_migrations gauge")
        assert wait_until(lambda: _get(f"http://127.0.0.1:{env['XMS_UI_PORT']}/"), 60, "web ui")
        # the CLI talks to it
        r = subprocess.run([sys.executable, "-m", "xms", "list", "--json"], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
        # a second server on the same ports refuses with one line and starts nothing
        second = subprocess.run([sys.executable, "-m", "xms", "server"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("xms: error: port ") and "already in use" in lines[-1], second.stderr
        assert not any("Traceback" in ln for ln in lines)
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    # everything it started is gone: the Temporal port is free again and no process holds the db
    from workers.devserver import check_port_free

    check_port_free("127.0.0.1", int(port), "temporal")
    r = subprocess.run(["pgrep", "-f", str(tmp_path / "data" / "temporal.db")], capture_output=True)
    assert r.returncode == 1, r.stdout


def test_demo_completes_with_matching_checksums(tmp_path):
    env = _env(tmp_path)
    r = subprocess.run([sys.executable, "-m", "xms", "demo"], env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Completed" in r.stdout
    sums = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] in ("source", "target") and parts[2] == "sha256":
            sums[(parts[0], parts[1])] = parts[3]
    assert sums[("disk0", "source")] == sums[("disk0", "target")]
    assert sums[("disk1", "source")] == sums[("disk1", "target")]
    assert "Web UI: http://127.0.0.1:" in r.stdout


def test_dev_server_ready_only_when_its_own_frontend_answers(tmp_path, monkeypatch):
    """A listener that is not Temporal's frontend on the chosen port is not readiness.

    The race seen in CI: the frontend port was taken between our check and the server's bind
    (by one of the server's own randomly placed services); the port accepted connections, the
    frontend had panicked. Here another socket holds the port and the free-port check is skipped.
    """
    import socket

    from workers import devserver
    from xms.errors import XmsError

    monkeypatch.setattr(devserver, "check_port_free", lambda *a: None)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = devserver.DevServer(host="127.0.0.1", port=port, ui_port=free_port(),
                                     db_file=tmp_path / "t.db", log_file=tmp_path / "t.log")
        with pytest.raises(XmsError, match="exited"):
            server.start()
        server.stop()
    assert "address already in use" in (tmp_path / "t.log").read_text(errors="replace")


def test_free_ports_lie_below_the_ephemeral_range():
    """The dev server's own five extra listeners take ephemeral ports; ours must not be one of them."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {free_port() for _ in range(50)}
    assert all(10000 <= p < low for p in ports) and len(ports) > 40
