"""Payload encryption (XMS_PAYLOAD_KEY): the Temporal server and its history hold no source
paths, project names or volume ids in clear, while xms itself reads everything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig

import pytest

from tests.conftest import MiB, start_stack
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(300)


def test_history_is_ciphertext_with_a_payload_key(tmp_path, monkeypatch):
    monkeypatch.setenv("XMS_PAYLOAD_KEY", os.urandom(32).hex())
    st = start_stack(tmp_path / "enc")
    try:
        src = make_disk(tmp_path / "secret-source-path.raw", 16 * MiB, [(0, MiB)], seed=91)
        name = "codec-1"
        r = st.cli("migrate", name, "--disk", str(src), "--project", "secretproject", "--volume-type",
                   "standard-ssd", "--no-snapshot", "--wait", "--json")
        assert r.returncode == 0, r.stderr
        view = json.loads(r.stdout)
        assert view["phase"] == "Completed" and view["disks"][0]["match"]  # xms reads its own payloads
        volume_id = view["disks"][0]["volume_id"]
        temporal = shutil.which("temporal", path=sysconfig.get_path("scripts"))
        raw = subprocess.run([temporal, "workflow", "show", "--address", st.server.address, "-w", name, "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        assert "YmluYXJ5L2VuY3J5cHRlZA" in raw  # base64 of the codec's "binary/encrypted" encoding
        for secret in (str(src), "secret-source-path", "secretproject", volume_id):
            assert secret not in raw, f"{secret} is in clear in the history"
        # a client without the key reads nothing
        bad = st.cli("status", name, "--json", env={"XMS_PAYLOAD_KEY": os.urandom(32).hex()})
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
        short = st.cli("list", env={"XMS_PAYLOAD_KEY": "too-short"})
        assert short.returncode == 1 and "XMS_PAYLOAD_KEY must be 32 bytes" in short.stderr
    finally:
        st.stop_worker()
        st.server.stop()
