"""Admission: bad input is refused with one clear line, a non-zero exit, and nothing left behind;
concurrent submissions can never both take the last GiB."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.conftest import MiB
from xms import client as xc
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory) -> Path:
    return make_disk(tmp_path_factory.mktemp("adm") / "small.raw", 64 * MiB, [(1 * MiB, 8 * MiB)], seed=31)


def assert_refused(r, *fragments: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # one clear line
    assert lines[0].startswith("xms: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def assert_nothing_left(stack, name: str, project: str) -> None:
    store = stack.store()
    assert store.list_volumes(migration=name) == []
    q = store.quota(project).quotas
    assert q["gigabytes"].reserved == 0 and q["volumes"].reserved == 0
    assert q["gigabytes"].in_use == 0


def test_unknown_volume_type_lists_valid_ones(stack, small_disk):
    r = stack.cli("migrate", "bad-type", "--disk", str(small_disk), "--project", "bad1", "--volume-type", "gold")
    assert_refused(r, "unknown volume type 'gold'", "valid types:", "archive-hdd", "performance-nvme", "standard-ssd")
    assert_nothing_left(stack, "bad-type", "bad1")


def test_az_the_type_cannot_serve(stack, small_disk):
    r = stack.cli("migrate", "bad-az", "--disk", str(small_disk), "--project", "bad2", "--volume-type",
                  "archive-hdd", "--az", "zone-a")
    assert_refused(r, "archive-hdd", "zone-b", "zone-a")
    assert_nothing_left(stack, "bad-az", "bad2")


def test_quota_exceeded_names_quota_and_numbers(stack, small_disk):
    assert stack.cli("quota", "bad3", "--set", "gigabytes_standard-ssd=0").returncode == 0
    r = stack.cli("migrate", "bad-quota", "--disk", str(small_disk), "--project", "bad3", "--volume-type",
                  "standard-ssd")
    assert_refused(r, "quota exceeded for project bad3", "gigabytes_standard-ssd", "requested 1 GiB",
                   "limit 0 GiB", "in use 0 GiB")
    assert_nothing_left(stack, "bad-quota", "bad3")


@pytest.mark.parametrize("source,fragment", [
    ("/nonexistent/disk.qcow2", "no such file"),
    ("nbd+unix:///?socket=/nonexistent/nbd.sock", "cannot open"),
    ("http://example.com/disk.img", "unsupported disk source"),
])
def test_missing_or_unreadable_source(stack, source, fragment):
    r = stack.cli("migrate", "bad-src", "--disk", source, "--project", "bad4", "--volume-type", "standard-ssd")
    assert_refused(r, fragment)
    assert_nothing_left(stack, "bad-src", "bad4")


def test_source_that_is_not_a_disk_image(stack, tmp_path):
    d = tmp_path / "a-directory"
    d.mkdir()
    r = stack.cli("migrate", "bad-src2", "--disk", str(d), "--project", "bad4", "--volume-type", "standard-ssd")
    assert_refused(r, "not a regular file")
    assert_nothing_left(stack, "bad-src2", "bad4")


def test_duplicate_migration_name(stack, small_disk):
    ok = stack.cli("migrate", "dup-name", "--disk", str(small_disk), "--project", "dup", "--volume-type",
                   "standard-ssd", "--no-snapshot", "--wait")
    assert ok.returncode == 0, ok.stderr
    r = stack.cli("migrate", "dup-name", "--disk", str(small_disk), "--project", "dup", "--volume-type",
                  "standard-ssd")
    assert_refused(r, "'dup-name' already exists")
    vols = stack.store().list_volumes(migration="dup-name")
    assert len(vols) == 1  # the first migration's volume only
    assert stack.store().quota("dup").quotas["gigabytes"].reserved == 0


def test_invalid_request_values(stack, small_disk):
    r = stack.cli("migrate", "Bad Name", "--disk", str(small_disk), "--project", "p", "--volume-type", "standard-ssd")
    assert_refused(r, "name", "lower-case letters")
    r = stack.cli("migrate", "ok-name", "--disk", str(small_disk), "--project", "p", "--volume-type",
                  "standard-ssd", "--heartbeat-timeout", "0")
    assert_refused(r, "heartbeat_timeout_s")
    assert_nothing_left(stack, "ok-name", "p")


@pytest.mark.parametrize("content,fragment", [
    ("backends: {a: {path: x, availability_zone: z}}\nvolume_types: {t: {backend: missing}}\n",
     "names backend 'missing'"),
    ("backends: [\n", "not valid YAML"),
    ("backends: {a: {path: x, availability_zone: z}}\nvolume_types: {t: {backend: a, granularity_gib: 0}}\n",
     "granularity_gib"),
    ("backends: {a: {path: x, availability_zone: z}}\nvolume_types: {t: {backend: a}}\n"
     "quotas: {default: {bogus: 1}}\n", "unknown quota key 'bogus'"),
])
def test_invalid_config_value(stack, tmp_path, content, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    r = stack.cli("volume-types", env={"XMS_CONFIG": str(cfg)})
    assert_refused(r, str(cfg), fragment)


def test_quota_set_rejects_bad_values(stack):
    assert_refused(stack.cli("quota", "q", "--set", "gigabytes=-5"), "gigabytes=-5")
    assert_refused(stack.cli("quota", "q", "--set", "disks=3"), "unknown quota key 'disks'")


async def test_concurrent_submissions_cannot_both_take_the_last_gib(stack, client, tmp_path):
    """Two migrations of 2 GiB each against a 3 GiB quota, submitted at the same moment."""
    assert stack.cli("quota", "race", "--set", "gigabytes=3").returncode == 0
    disks = [make_disk(tmp_path / f"r{i}.raw", 1536 * MiB, [(0, 4 * MiB)], seed=40 + i) for i in range(2)]
    reqs = [xc.build_request(name=f"race-{i}", disks=[str(disks[i])], project="race", volume_type="standard-ssd",
                             snapshot=False) for i in range(2)]
    results = await asyncio.gather(*(xc.submit(client, stack.settings, r) for r in reqs), return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(accepted) == 1 and len(refused) == 1, results
    assert isinstance(refused[0], xc.Refused) and refused[0].type == "QuotaExceeded"
    assert "gigabytes requested 2 GiB, limit 3 GiB" in str(refused[0])
    loser = reqs[results.index(refused[0])].name
    winner = reqs[results.index(accepted[0])].name
    done = await xc.wait(client, winner)
    assert done.phase.value == "Completed"
    store = stack.store()
    assert store.list_volumes(migration=loser) == []
    q = store.quota("race").quotas["gigabytes"]
    assert (q.in_use, q.reserved) == (2, 0)
    st = json.loads(stack.cli("status", loser, "--json").stdout)
    assert st["phase"] == "Failed" and "quota exceeded" in st["reason"]
