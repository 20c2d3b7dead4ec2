"""Payload encryption (XMS_PAYLOAD_KEY): the Temporal server and its history hold no source
paths, project names or volume ids in clear, while xms itself reads everything."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import MiB, start_stack, workflow_show
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
        raw = workflow_show(st, name)  # payloads decoded from base64 too
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


def test_history_is_clear_without_a_key(stack, tmp_path):
    """The control: without XMS_PAYLOAD_KEY the same check does find the path (so it can fail)."""
    src = make_disk(tmp_path / "clear-source-path.raw", 16 * MiB, [(0, MiB)], seed=92)
    r = stack.cli("migrate", "codec-clear", "--disk", str(src), "--project", "clearproject", "--volume-type",
                  "standard-ssd", "--no-snapshot", "--wait")
    assert r.returncode == 0, r.stderr
    text = workflow_show(stack, "codec-clear")
    assert str(src) in text and "clearproject" in text
