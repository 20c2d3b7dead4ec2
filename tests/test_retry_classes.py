"""Retry classes: transient faults are retried with backoff and the migration completes; permanent
ones (quota, unknown volume type, unreadable source, lost change tracking, a full target) fail on
their first attempt as non-retryable application errors, with one clear line.

The evidence is Temporal's own record: the history's ActivityTaskStarted (the attempt that ran
last, with the previous attempt's failure), ActivityTaskFailed (type, non_retryable, retry state)
and WorkflowExecutionFailed, and describe's pending activity (attempt, retry interval)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType, RetryState
from temporalio.client import WorkflowFailureError

from chaos.harness import Nbdkit, activity_attempts
from tests.conftest import MiB, raw_sha256, sha256_file
from tests.test_warm import qemu_io, xms_bitmaps
from xms import client as xc
from xms.demo import make_disk
from xms.errors import TargetOutOfSpace

pytestmark = pytest.mark.timeout(600)


async def workflow_failure(client, name: str):
    """The failure of a Failed workflow, from its WorkflowExecutionFailed event."""
    handle = client.get_workflow_handle(name)
    try:
        await asyncio.wait_for(handle.result(), 120)  # admission answers before the cleanup has run
    except WorkflowFailureError:
        pass
    hist = await handle.fetch_history()
    failed = [e for e in hist.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED]
    assert failed, f"{name} did not fail"
    return failed[-1].workflow_execution_failed_event_attributes.failure


async def refused(stack, client, **fields) -> xc.Refused:
    with pytest.raises(xc.Refused) as e:
        await xc.submit(client, stack.settings, xc.build_request(**fields))
    return e.value


async def wait_view(client, name: str, pred, what: str, timeout: float = 240) -> xc.MigrationView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await xc.view(client, name)
        if pred(v):
            return v
        await asyncio.sleep(0.3)  # poll interval of a condition wait with a deadline
    raise AssertionError(f"timed out after {timeout}s waiting for {name}: {what}")


def assert_first_attempt_non_retryable(attempts: dict, activity: str, error_type: str) -> dict:
    a = attempts[activity]
    assert a["max_attempt"] == 1, a  # never retried
    (f,) = [f for f in a["failures"] if f["type"] == error_type]
    assert f["non_retryable"] is True and f["attempt"] == 1, f
    assert f["retry_state"] == RetryState.RETRY_STATE_NON_RETRYABLE_FAILURE, f
    assert "\n" not in f["message"] and f["message"], f
    return f


# --------------------------------------------------------------------------- transient


async def test_transient_read_errors_are_retried_with_backoff(stack, client, tmp_path):
    """Every source read fails (nbdkit's error filter, EIO) until three attempts have failed; then the
    source heals. copy_disk fails with TransientIOError, Temporal retries it 1 s then 2 s later
    (backoff coefficient 2), and the migration completes with matching checksums."""
    raw = make_disk(tmp_path / "flaky.raw", 128 * MiB, [(8 * MiB, 24 * MiB), (96 * MiB, 8 * MiB)], seed=601)
    want, size = raw_sha256(raw, tmp_path)
    trigger = tmp_path / "errors-on"
    srv = Nbdkit(raw, tmp_path / "flaky.sock", filters=["error"],
                 params=["error-pread-rate=100%", "error-pread=EIO", f"error-file={trigger}"],
                 log=tmp_path / "nbdkit.log").start()
    name = "retry-transient"
    try:
        await xc.submit(client, stack.settings, xc.build_request(
            name=name, disks=[srv.uri], project="retry1", volume_type="standard-ssd", heartbeat_timeout_s=10,
            snapshot=False))
        trigger.touch()  # after admission: the probe's read must succeed, every copy read fails
        handle = client.get_workflow_handle(name)
        seen: dict[int, float | None] = {}
        deadline = time.monotonic() + 120
        while max(seen, default=0) < 3:
            assert time.monotonic() < deadline, f"copy_disk did not reach attempt 3: {seen}"
            for pa in (await handle.describe()).raw_description.pending_activities:
                if pa.activity_type.name == "copy_disk" and pa.attempt > 1 and pa.last_failure.message:
                    assert pa.last_failure.application_failure_info.type == "TransientIOError", pa.last_failure
                    assert not pa.last_failure.application_failure_info.non_retryable
                    interval = pa.current_retry_interval.ToTimedelta().total_seconds() \
                        if pa.HasField("current_retry_interval") else None
                    seen.setdefault(pa.attempt, interval)
            await asyncio.sleep(0.1)  # poll interval of a condition wait with a deadline
        trigger.unlink()
        v = await xc.wait(client, name)
        assert v.phase.value == "Completed", v.reason
        assert v.disks[0].match is True
        vol = stack.store().get_volume(v.disks[0].volume_id)
        assert sha256_file(Path(vol.path), size) == want
        # backoff: 1 s before attempt 2, 2 s before attempt 3 (where the server reports it)
        if seen.get(2) is not None and seen.get(3) is not None:
            assert seen[2] == pytest.approx(1.0, abs=0.01) and seen[3] == pytest.approx(2.0, abs=0.01), seen
        copy = (await activity_attempts(handle))["copy_disk"]
        assert copy["max_attempt"] >= 3, copy  # the attempt that completed was a retry
        assert copy["retried_after"][0]["type"] == "TransientIOError", copy
        assert copy["failures"] == []  # no attempt gave up
        # the scheduled retry policy is the one that made it so
        hist = await handle.fetch_history()
        sched = next(e.activity_task_scheduled_event_attributes for e in hist.events
                     if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                     and e.activity_task_scheduled_event_attributes.activity_type.name == "copy_disk")
        rp = sched.retry_policy
        assert rp.backoff_coefficient == 2 and rp.initial_interval.ToTimedelta().total_seconds() == 1
        assert "TransientIOError" not in rp.non_retryable_error_types
        assert {"QuotaExceeded", "SourceUnreadable", "ChangeTrackingLost", "TargetOutOfSpace"} <= set(
            rp.non_retryable_error_types)
    finally:
        trigger.unlink(missing_ok=True)
        srv.stop()


# --------------------------------------------------------------------------- permanent, at admission


async def test_quota_fails_at_once(stack, client, tmp_path):
    disk = make_disk(tmp_path / "q.raw", 32 * MiB, [(0, MiB)], seed=602)
    stack.store().set_quota("retry2", {"gigabytes": 0})
    e = await refused(stack, client, name="retry-quota", disks=[str(disk)], project="retry2",
                      volume_type="standard-ssd")
    assert e.type == "QuotaExceeded" and "quota exceeded for project retry2" in str(e)
    attempts = await activity_attempts(client.get_workflow_handle("retry-quota"))
    assert_first_attempt_non_retryable(attempts, "reserve", "QuotaExceeded")
    f = await workflow_failure(client, "retry-quota")
    assert f.application_failure_info.type == "QuotaExceeded" and f.application_failure_info.non_retryable
    assert stack.store().list_volumes(migration="retry-quota") == []


async def test_unknown_volume_type_fails_at_once(stack, client, tmp_path):
    disk = make_disk(tmp_path / "t.raw", 32 * MiB, [(0, MiB)], seed=603)
    e = await refused(stack, client, name="retry-type", disks=[str(disk)], project="retry3", volume_type="gold")
    assert e.type == "UnknownVolumeType" and "unknown volume type 'gold'" in str(e)
    assert_first_attempt_non_retryable(await activity_attempts(client.get_workflow_handle("retry-type")),
                                       "validate", "UnknownVolumeType")
    f = await workflow_failure(client, "retry-type")
    assert f.application_failure_info.type == "UnknownVolumeType" and f.application_failure_info.non_retryable


@pytest.mark.parametrize("kind", ["missing-file", "not-an-image-format", "dead-nbd-socket"])
async def test_unreadable_source_fails_at_once(stack, client, tmp_path, kind):
    if kind == "missing-file":
        src, fragment = str(tmp_path / "nope.qcow2"), "no such file"
    elif kind == "not-an-image-format":
        p = tmp_path / "disk.vmdk"
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(p), "16M"], check=True)
        src, fragment = str(p), "is not supported"
    else:
        src, fragment = f"nbd+unix:///?socket={tmp_path / 'gone.sock'}", "cannot open"
    name = f"retry-src-{kind}"
    e = await refused(stack, client, name=name, disks=[src], project="retry4", volume_type="standard-ssd")
    assert e.type == "SourceUnreadable" and fragment in str(e), str(e)
    assert_first_attempt_non_retryable(await activity_attempts(client.get_workflow_handle(name)),
                                       "validate", "SourceUnreadable")
    f = await workflow_failure(client, name)
    assert f.application_failure_info.type == "SourceUnreadable" and f.application_failure_info.non_retryable


# --------------------------------------------------------------------------- permanent, during a sync


@pytest.mark.parametrize("corruption", ["bitmap-removed", "bitmap-inconsistent"])
async def test_lost_change_tracking_fails_the_sync_at_once(stack, client, tmp_path, corruption):
    """A warm source whose dirty bitmap is removed, or left in-use (inconsistent) by a writer that
    was killed with the image open, between syncs: the sync's copy fails on its first attempt with
    ChangeTrackingLost (non-retryable), the reason is one line, the migration stays Ready."""
    img = make_disk(tmp_path / "w.qcow2", 64 * MiB, [(0, 8 * MiB)], fmt="qcow2", seed=604)
    name = f"retry-cbt-{corruption}"
    await xc.submit(client, stack.settings, xc.build_request(
        name=name, disks=[str(img)], project="retry5", volume_type="standard-ssd", mode="warm",
        sync_interval_s=3600, snapshot=False))
    await wait_view(client, name, lambda v: v.phase.value == "Ready", "Ready")
    assert xms_bitmaps(img) == ["xms-1"]
    if corruption == "bitmap-removed":
        qemu_io(img, "write -P 3 1M 64k")
        subprocess.run(["qemu-img", "bitmap", "--remove", str(img), "xms-1"], check=True)
        fragment = "no xms dirty bitmap is left"
    else:  # a writer SIGKILLed with the image open read-write: qemu leaves the bitmap marked in-use
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 4 2M 64k", "-c", "sigraise 9", str(img)],
                           capture_output=True, text=True)
        assert r.returncode == -9, r
        fragment = "dirty bitmap xms-1 is inconsistent"
    await client.get_workflow_handle(name).signal("sync_now")
    v = await wait_view(client, name, lambda v: v.syncs_failed == 1 and v.phase.value == "Ready", "the sync to fail")
    err = v.last_sync.error
    assert fragment in err and "full sync is needed" in err and "\n" not in err, err
    copy = (await activity_attempts(client.get_workflow_handle(name)))["copy_disk"]
    (f,) = [f for f in copy["failures"] if f["type"] == "ChangeTrackingLost"]
    assert f["non_retryable"] is True and f["attempt"] == 1, copy
    assert f["retry_state"] == RetryState.RETRY_STATE_NON_RETRYABLE_FAILURE
    await client.get_workflow_handle(name).cancel()
    await wait_view(client, name, lambda v: v.phase.value == "Cancelled", "Cancelled")
    assert xms_bitmaps(img) == []  # even an inconsistent bitmap is removed when tracking stops
    assert stack.store().list_volumes(migration=name) == []


# --------------------------------------------------------------------------- permanent, in the copy engine


def test_full_target_is_a_permanent_error(tmp_path):
    """ENOSPC from the target (here /dev/full, which answers every write with it) is TargetOutOfSpace:
    not retryable, one line; a source I/O error stays retryable."""
    from activities import copyengine
    from activities.transport import nbd as transport

    raw = make_disk(tmp_path / "s.raw", 16 * MiB, [(0, 4 * MiB)], seed=605)
    with transport.handle(str(raw), "image", "raw") as h:
        plan = [e for e in transport.extents(h, 0, 16 * MiB) if not e.zero]
        w = copyengine.FileWriter("/dev/full")
        try:
            with pytest.raises(TargetOutOfSpace) as e:
                copyengine.copy(h, plan, w, fresh=True)
        finally:
            w.close()
    assert not e.value.retryable and "ran out of space" in str(e.value) and "\n" not in str(e.value)


def test_flaky_reads_are_retried_in_place(tmp_path):
    """A source that fails 5 % of its reads with EIO (nbdkit's error filter): the copy engine issues
    each failed read again (READ_RETRIES), so one attempt copies and checksums the disk exactly;
    a dead connection is not retried in place (the attempt fails and Temporal retries it)."""
    import hashlib

    from activities import copyengine
    from activities.transport import nbd as transport
    from xms.errors import TransientIOError

    size = 64 * MiB
    raw = make_disk(tmp_path / "f.raw", size, [(0, 24 * MiB), (40 * MiB, 16 * MiB)], seed=606)
    srv = Nbdkit(raw, tmp_path / "f.sock", filters=["error"], params=["error-pread-rate=5%", "error-pread=EIO"],
                 log=tmp_path / "nbdkit.log").start()
    try:
        target = tmp_path / "t.img"
        with open(target, "wb") as f:
            f.truncate(size)
        with transport.handle(srv.uri, "nbd") as h:
            extents = list(transport.extents(h, 0, size))
            w = copyengine.FileWriter(str(target))
            try:
                # 64 KiB requests: ~670 reads, so some fail for certain (at 512 KiB, 80 reads all
                # passed in 1.7 % of runs), and five failures in a row of one read stay improbable
                stats = copyengine.copy(h, [e for e in extents if not e.zero], w, fresh=True, request=64 * 1024)
            finally:
                w.close()
            assert copyengine.checksum(h, size, extents) == copyengine.checksum(h, size, extents)
        assert stats.read_retries > 0 and stats.offset == size
        assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(raw.read_bytes()).hexdigest()
        assert srv.log.read_text().count("injecting EIO error") >= stats.read_retries
        # the server gone mid-copy: no retry in place, a TransientIOError for Temporal to retry
        with transport.handle(srv.uri, "nbd") as h:
            srv.kill()
            w = copyengine.FileWriter(str(target))
            try:
                with pytest.raises(TransientIOError):
                    copyengine.copy(h, [e for e in extents if not e.zero], w, fresh=False)
            finally:
                w.close()
    finally:
        srv.stop()
