"""NBD URI sources (qemu-nbd and nbdkit, real servers) and an encrypted (LUKS) target."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MiB, raw_sha256, wait_until
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def nbd_servers(tmp_path):
    """A qcow2 disk behind qemu-nbd and a raw disk behind nbdkit's file plugin, on unix sockets."""
    q = make_disk(tmp_path / "q.qcow2", 200 * MiB, [(2 * MiB, 30 * MiB)], fmt="qcow2", seed=51)
    k = make_disk(tmp_path / "k.raw", 150 * MiB + 512, [(100 * MiB, 20 * MiB)], seed=52)
    qs, ks = tmp_path / "q.sock", tmp_path / "k.sock"
    procs = [
        subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", str(qs), str(q)]),
        subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(ks), "file", str(k)]),
    ]
    wait_until(lambda: qs.exists() and ks.exists(), 30, "NBD sockets")
    yield [(f"nbd+unix:///?socket={qs}", q), (f"nbd+unix:///?socket={ks}", k)]
    for p in procs:
        p.terminate()
        p.wait()


def test_nbd_uri_sources(stack, nbd_servers, tmp_path):
    r = stack.cli("migrate", "nbd-src", *sum((["--disk", uri] for uri, _ in nbd_servers), []),
                  "--project", "nbd", "--volume-type", "performance-nvme", "--no-snapshot", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["phase"] == "Completed"
    store = stack.store()
    for disk, (_, image) in zip(view["disks"], nbd_servers):
        want, size = raw_sha256(image, tmp_path)
        vol = store.get_volume(disk["volume_id"])
        with open(vol.path, "rb") as f:
            import hashlib

            assert hashlib.sha256(f.read(size)).hexdigest() == want
        assert disk["match"] and vol.backend == "nvme-a"


def test_encrypted_target_is_encrypted_at_rest(stack, tmp_path):
    marker = b"XMS-PLAINTEXT-MARKER-" * 200
    src = make_disk(tmp_path / "secret.raw", 64 * MiB, [(4 * MiB, 4 * MiB)], seed=53)
    with open(src, "r+b") as f:
        f.seek(20 * MiB)
        f.write(marker)
    r = stack.cli("migrate", "enc-1", "--disk", str(src), "--project", "enc", "--volume-type", "encrypted-ssd",
                  "--no-snapshot", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    disk = view["disks"][0]
    # verify read the target back through qemu-nbd with the key: same checksum as the source
    assert disk["match"] is True and disk["source_sha256"] == disk["target_sha256"]
    vol = stack.store().get_volume(disk["volume_id"])
    assert vol.format == "qcow2" and vol.encrypted
    raw = Path(vol.path).read_bytes()
    assert marker[:64] not in raw  # the bytes at rest are not the plaintext
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", vol.path], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
