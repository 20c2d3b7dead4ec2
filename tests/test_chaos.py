"""The chaos harness's short form (``python -m chaos.run --short``) as a test: every scenario ends
as expected (Completed with equal hashes, Failed with a clear reason, or Cancelled) and nothing
is left behind. Runs as a subprocess: it owns a stack, a loop mount and its own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="the out-of-space fault loop-mounts a filesystem (root only)"),
]


def test_chaos_short(tmp_path):
    out = tmp_path / "summary.json"
    r = subprocess.run(
        [sys.executable, "-m", "chaos.run", "--short", "--json", str(out), "--dir", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=840,
    )
    print(r.stdout)
    assert out.exists(), r.stderr[-4000:]
    s = json.loads(out.read_text())
    assert s["leak_count"] == 0, s["leaks"]
    assert s["unexpected"] == [], s["unexpected"]
    for sc in s["scenarios"]:
        assert sc["outcome"] == sc["expect"] or sc["known_bug"], sc
        assert not sc["leaks"] or sc["known_bug"], sc
        if sc["outcome"] == "completed" and not sc["known_bug"]:
            assert sc["hashes_equal"] is True, sc
        if sc["outcome"] == "failed":
            assert sc["reason"] and "\n" not in sc["reason"], sc
    ran = {sc["scenario"] for sc in s["scenarios"]}
    assert {"nbd-error", "nbd-delay", "source-restart", "target-full", "server-kill", "cancel-reserve",
            "cancel-fullsync", "cancel-ready", "cancel-syncing", "cbt-lost"} <= ran
    assert sum(x.startswith("worker-kill-") for x in ran) == 3
    kinds = s["faults_injected"]
    for kind in ("nbdkit-error-filter", "nbdkit-delay-filter", "source-nbdkit-sigkill", "target-enospc",
                 "worker-sigkill", "temporal-sigkill-restart", "cancel", "bitmap-removed"):
        assert kinds.get(kind, 0) >= 1, kinds
    assert s["ok"] is True and r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert any("out of space" in reason for reason in s["failure_reasons"]), s["failure_reasons"]


CHILD = """
import sys, time
from activities.transport import nbd as transport
h = transport.connect(sys.argv[1], "image", "raw")
print("connected", flush=True)
time.sleep(600)
"""


def test_private_qemu_nbd_dies_with_a_killed_client(tmp_path):
    """A process SIGKILLed at random moments while it starts a local image's private qemu-nbd
    (systemd socket activation) never leaves that qemu-nbd behind, even when it dies before
    connecting (found by the worker-kill runs: such a qemu-nbd used to listen for ever)."""
    import random
    import signal
    import time

    from chaos.harness import describe_process, session_processes

    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    rng, env = random.Random(66), {**os.environ, "PYTHONPATH": str(ROOT)}
    left = []
    for i in range(20):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(img)], cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the dangerous moment: qemu-nbd forked, the client not yet through the handshake
        deadline = time.monotonic() + 30
        while not any(w == "qemu-nbd" for _, w in session_processes(p.pid)) and time.monotonic() < deadline:
            time.sleep(0.002)  # poll interval of a condition wait with a deadline
        if i % 2:
            time.sleep(rng.uniform(0, 0.05))  # the fault's random point, not a wait
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 10
        while session_processes(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # poll interval of a condition wait with a deadline
        for pid, what in session_processes(p.pid):
            left.append(f"{what}: {describe_process(pid)}")
            os.kill(pid, signal.SIGKILL)
    assert left == []


def test_a_process_that_exits_with_a_private_qemu_nbd_open_exits(tmp_path):
    """Interpreter exit with a local image's handle still open neither hangs (waiting for a
    qemu-nbd whose client is still connected) nor leaves that qemu-nbd behind."""
    import time

    from chaos.harness import session_processes

    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    code = "from activities.transport import nbd as t\nh = t.connect(__import__('sys').argv[1], 'image', 'raw')\n"
    p = subprocess.Popen([sys.executable, "-c", code, str(img)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         start_new_session=True)
    assert p.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while [w for _, w in session_processes(p.pid) if w == "qemu-nbd"] and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval of a condition wait with a deadline
    assert [w for _, w in session_processes(p.pid) if w == "qemu-nbd"] == []
