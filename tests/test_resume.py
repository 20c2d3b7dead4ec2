"""A worker SIGKILLed in the middle of a copy: the next worker resumes at the heartbeated offset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import GiB, MiB, raw_sha256, sha256_file, tail_is_zero, wait_until
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(600)


def test_worker_killed_mid_copy_resumes(stack, tmp_path):
    src = make_disk(tmp_path / "big.qcow2", GiB, [(0, 320 * MiB), (512 * MiB, 256 * MiB)], fmt="qcow2", seed=21)
    # throttled-ssd writes at 48 MiB/s, so the copy of ~576 MiB lasts ~12 s: long enough to interrupt
    r = stack.cli("migrate", "resume-1", "--disk", str(src), "--project", "resume", "--volume-type",
                  "throttled-ssd", "--heartbeat-timeout", "4", "--no-snapshot")
    assert r.returncode == 0, r.stderr

    def heartbeated() -> int:
        d = json.loads(stack.cli("status", "resume-1", "--json").stdout)["disks"][0]
        return d["bytes_copied"] if d["copy_state"] == "copying" and d["bytes_copied"] >= 64 * MiB else 0

    copied_before_kill = wait_until(heartbeated, 120, "a heartbeat with >= 64 MiB copied")
    stack.kill_worker()
    stack.start_worker()
    r = stack.cli("status", "resume-1", "--watch", "--json", timeout=300)
    view = json.loads(_last_json(r.stdout))
    assert view["phase"] == "Completed", view.get("reason")
    disk = view["disks"][0]
    # the second attempt started from the last heartbeated offset, not from zero
    assert disk["resumed_from"] > 0
    assert disk["resumed_from"] <= 576 * MiB
    assert copied_before_kill >= 64 * MiB
    vol = stack.store().get_volume(disk["volume_id"])
    want, size = raw_sha256(src, tmp_path)
    assert sha256_file(Path(vol.path), size) == want and tail_is_zero(Path(vol.path), size)
    assert disk["match"] is True


def _last_json(text: str) -> str:
    """`status --watch --json` prints one JSON document per refresh; return the last one."""
    depth, start, last = 0, None, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                last = text[start : i + 1]
    assert last, text
    return last
