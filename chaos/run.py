"""Run the chaos scenarios against one private stack and report what happened.

    .venv/bin/python -m chaos.run [--short] [--runs N] [--seed S] [--json PATH] [--dir DIR] [--keep]
                                  [--only SCENARIO,…] [--strict]

Every scenario injects real faults and must end as expected — Completed with the source's
and the target's hashes equal, Failed with a clear one-line reason, or Cancelled — and then
leave nothing behind: no volumes of a migration that did not complete, no quota reserved, no
reservation rows of failed or cancelled migrations, no volume/snapshot/key files without a
row, no process a worker started (qemu-nbd, qemu-img, …) still running, no socket or private
NBD directory in the data dir, no xms bitmap on a warm source, no workflow still running.

Scenarios (and the policy each one checks):

* ``baseline``        no fault; its duration places the worker kills.
* ``nbd-error``       nbdkit ``error`` filter, 1 % of source reads fail with EIO (armed once
                      admitted: a probe read that fails is a refusal, by design). The copy
                      engine issues a failed read again (up to 4 times); a read that keeps
                      failing fails the attempt with TransientIOError, which Temporal retries
                      with backoff, resuming at the heartbeated offset → Completed.
* ``nbd-delay``       nbdkit ``delay`` filter, every read stalls 5 s on a sparse source (few
                      reads), with a 4 s heartbeat timeout: heartbeats come from the activity
                      thread, not the reads, so a stall is not a lost worker → Completed.
* ``source-restart``  the nbdkit serving the source is SIGKILLed mid-copy and started again
                      once an attempt has failed. Policy: a source that answered at admission
                      and cannot be reached now is retried (SourceUnreachable) with the copy's
                      backoff (10 attempts, ≈ 4 min), resuming where it stopped → Completed.
* ``source-gone``     (full mode) the same, but it never comes back → Failed, "cannot reach
                      source …", volumes deleted and quota released.
* ``target-full``     the volume type's backend is a 64 MiB loop-mounted ext4 → Failed at once
                      (TargetOutOfSpace, not retried), the volume deleted, the space returned.
* ``worker-kill-N``   the worker SIGKILLed (the process alone, not its group) at a random
                      point of a cold migration (seeded), then started again → Completed.
* ``worker-kill-snapshot`` (full mode) the worker SIGKILLed during the post-migration snapshot
                      → Completed within 2 minutes, no half-built snapshot file left.
* ``server-kill``     the Temporal dev server SIGKILLed mid-copy and started on the same
                      SQLite file → Completed.
* ``cancel-reserve``  cancelled while ``reserve`` waits for the store's lock (held by the
                      harness), which then succeeds → Cancelled all the same; the reservation
                      made after the cancel is released.
* ``cancel-fullsync``, ``cancel-ready`` (warm), ``cancel-syncing`` (warm) → Cancelled.
* ``cbt-lost``        warm; the source's tracking bitmap is removed between syncs: the sync
                      fails once, not retried (ChangeTrackingLost, one line); then cancelled.

Exit status: 0 when every scenario ended as expected and no leak was found, 1 otherwise.
Scenarios listed in ``KNOWN_BUGS`` (a product bug in a file the harness may not change, with
the proposed fix) are reported apart and fail the run only with ``--strict``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from chaos.harness import (
    Harness,
    Hung,
    LoopFs,
    Nbdkit,
    make_disk,
    qemu_io,
    source_sha256,
)
from xms.models import GiB, MiB

SIZE = 384 * MiB
REGIONS = [(4 * MiB, 64 * MiB), (128 * MiB, 48 * MiB), (256 * MiB, 48 * MiB)]  # 160 MiB of data
# Scenarios that fail today because of a bug in a file this harness may not change; each names
# the fix proposed for it. They are reported apart ("known product bugs") and do not fail the run
# unless --strict; one that passes is reported as fixed, so the entry can go.
KNOWN_BUGS: dict[str, tuple[str, str]] = {
    # scenario: (the wrong outcome it shows today, the bug and the proposed fix). Both entries this
    # harness found — a cancel lost when the short activity it interrupted then succeeded
    # (cancel-reserve), and a worker killed during Snapshot noticed only after 2 h plus the
    # half-built snapshot it left (worker-kill-snapshot) — were fixed in f1ca907.
}
SNAPSHOT_RECOVERY_S = 120  # a worker killed during Snapshot must be replaced well within this
WAIT_S = 420  # a migration's bound: covers a 5-minute start-to-close timeout after a kill
KILL_RUNS_FULL, KILL_RUNS_SHORT = 20, 3


@dataclass
class Result:
    scenario: str
    expect: str  # completed | failed | cancelled
    name: str = ""
    outcome: str = "error"  # completed | failed | cancelled | hung | error | unexpected phase
    ok: bool = False
    reason: str | None = None
    detail: str = ""  # what was unexpected
    faults: list[str] = field(default_factory=list)
    hashes_equal: bool | None = None
    leaks: list[str] = field(default_factory=list)
    known_bug: str = ""  # KNOWN_BUGS entry this run reproduced
    duration_s: float = 0.0
    notes: dict = field(default_factory=dict)


class Chaos:
    def __init__(self, h: Harness, seed: int, tag: str):
        self.h, self.rng, self.tag = h, random.Random(seed), tag
        self.disk_a: Path | None = None
        self.want_a: str = ""
        self.baseline_s: float = 0.0

    def name(self, scenario: str) -> str:
        return f"{scenario}-{self.tag}"

    async def prepare(self) -> None:
        src = self.h.src
        self.disk_a = await asyncio.to_thread(make_disk, src / "a.qcow2", SIZE, REGIONS, "qcow2", 1)
        self.want_a, _ = await asyncio.to_thread(source_sha256, self.disk_a, src)

    # ------------------------------------------------------------------ common endings

    async def completed(self, r: Result, name: str, disks: list[tuple[str, int]], project: str,
                        bitmap_sources: list[Path] = (), timeout: float = WAIT_S) -> Result:
        """Wait for the end; expect Completed, each disk's checksums matching, and the target's bytes
        equal to ``disks``' (sha256, size) with zeroes past the source's end."""
        t0 = time.monotonic()
        v = await self.h.wait_closed(name, timeout)
        r.notes["closed_after_s"] = round(time.monotonic() - t0, 1)
        r.outcome, r.reason = v.phase.value.lower(), v.reason
        if v.phase.value != "Completed":
            r.detail = f"ended {v.phase.value}: {v.reason}"
        else:
            equal = len(v.disks) == len(disks)
            for d, (want, size) in zip(v.disks, disks):
                equal = equal and d.match is True and bool(d.volume_id) and await asyncio.to_thread(
                    self.h.target_matches, d.volume_id, want, size)
            r.hashes_equal = equal
            r.notes["resumed_from"] = [d.resumed_from for d in v.disks]
            if not equal:
                r.detail = "Completed, but the target's bytes differ from the source's"
        r.leaks = await self.h.leaks(name, project, volumes_expected=len(disks) if r.outcome == "completed" else 0,
                                     bitmap_sources=bitmap_sources)
        r.ok = r.outcome == "completed" and bool(r.hashes_equal) and not r.detail
        return r

    async def ended(self, r: Result, name: str, project: str, expect_phase: str, reason_re: str,
                    bitmap_sources: list[Path] = (), timeout: float = WAIT_S) -> Result:
        """Wait for the end; expect ``expect_phase`` with a one-line reason matching ``reason_re``."""
        v = await self.h.wait_closed(name, timeout)
        r.outcome, r.reason = v.phase.value.lower(), v.reason
        if v.phase.value != expect_phase:
            r.detail = f"ended {v.phase.value} ({v.reason}), expected {expect_phase}"
        elif not clear_reason(v.reason, reason_re):
            r.detail = f"reason is not one clear line matching /{reason_re}/: {v.reason!r}"
        r.leaks = await self.h.leaks(name, project, volumes_expected=len(v.disks) if r.outcome == "completed" else 0,
                                     bitmap_sources=bitmap_sources)
        r.ok = not r.detail
        return r

    # ------------------------------------------------------------------ scenarios

    async def baseline(self, r: Result) -> Result:
        name = r.name = self.name("baseline")
        await self.h.migrate(name, [str(self.disk_a)], project="c-base", volume_type="throttled-ssd",
                             heartbeat_timeout_s=4, snapshot=False)
        await self.completed(r, name, [(self.want_a, SIZE)], "c-base")
        self.baseline_s = r.notes["closed_after_s"]  # admitted → closed: where the kills are placed
        return r

    async def nbd_error(self, r: Result) -> Result:
        # 256 MiB of data: ~320 reads with verification, so 1 % fails some (P(none) ≈ 4 %)
        raw = await asyncio.to_thread(make_disk, self.h.src / "err.raw", 512 * MiB,
                                      [(8 * MiB, 128 * MiB), (256 * MiB, 128 * MiB)], "raw", 2)
        want, size = await asyncio.to_thread(source_sha256, raw, self.h.src)
        trigger = self.h.src / "err.armed"
        srv = Nbdkit(raw, self.h.src / "err.sock", filters=["error"],
                     params=["error-pread-rate=1%", "error-pread=EIO", f"error-file={trigger}"],
                     log=self.h.src / "nbdkit-err.log").start()
        try:
            name = r.name = self.name("nbd-error")
            await self.h.migrate(name, [srv.uri], project="c-err", heartbeat_timeout_s=10, snapshot=False)
            trigger.touch()
            r.faults.append("nbdkit-error-filter")
            await self.completed(r, name, [(want, size)], "c-err")
            attempts = (await self.h.activity_attempts(name)).get("copy_disk", {})
            r.notes["copy_attempts"] = attempts.get("max_attempt")
            r.notes["retried_after"] = sorted({f["type"] for f in attempts.get("retried_after", [])})
        finally:
            trigger.unlink(missing_ok=True)
            srv.stop()
        r.notes["read_errors_injected"] = srv.log.read_text(errors="replace").count("injecting EIO error")
        return r

    async def nbd_delay(self, r: Result) -> Result:
        regions = [(o * MiB, MiB) for o in (16, 80, 144, 208)]
        raw = await asyncio.to_thread(make_disk, self.h.src / "slow.raw", 256 * MiB, regions, "raw", 3)
        want, size = await asyncio.to_thread(source_sha256, raw, self.h.src)
        srv = Nbdkit(raw, self.h.src / "slow.sock", filters=["delay"], params=["delay-read=5"],
                     log=self.h.src / "nbdkit-slow.log").start()
        try:
            name = r.name = self.name("nbd-delay")
            r.faults.append("nbdkit-delay-filter")
            t0 = time.monotonic()
            await self.h.migrate(name, [srv.uri], project="c-slow", heartbeat_timeout_s=4, snapshot=False)
            await self.completed(r, name, [(want, size)], "c-slow")
            r.notes["submit_to_closed_s"] = round(time.monotonic() - t0, 1)
            r.notes["copy_attempts"] = (await self.h.activity_attempts(name)).get("copy_disk", {}).get("max_attempt")
        finally:
            srv.stop()
        return r

    async def _source_killed(self, r: Result, scenario: str, comes_back: bool) -> Result:
        raw = await asyncio.to_thread(make_disk, self.h.src / f"{scenario}.raw", SIZE,
                                      [(0, 96 * MiB), (192 * MiB, 96 * MiB)], "raw", 4)
        want, size = await asyncio.to_thread(source_sha256, raw, self.h.src)
        srv = Nbdkit(raw, self.h.src / f"{scenario}.sock", log=self.h.src / f"nbdkit-{scenario}.log").start()
        project = f"c-{scenario}"
        try:
            name = r.name = self.name(scenario)
            await self.h.migrate(name, [srv.uri], project=project, volume_type="throttled-ssd",
                                 heartbeat_timeout_s=4, snapshot=False)
            await self.h.wait_view(name, lambda v: v.disks[0].bytes_copied >= 48 * MiB, 180, "48 MiB copied")
            srv.kill()
            r.faults.append("source-nbdkit-sigkill")
            if comes_back:
                failed = await self.h.wait(lambda: self._copy_failed(name), 180, "a failed copy attempt")
                r.notes["failed_attempt"] = failed
                await asyncio.to_thread(srv.start)
                r.faults.append("source-nbdkit-restart")
                await self.completed(r, name, [(want, size)], project)
                r.notes["retried_after"] = sorted({f["type"] for f in (await self.h.activity_attempts(name))
                                                   .get("copy_disk", {}).get("retried_after", [])})
            else:
                await self.ended(r, name, project, "Failed", r"cannot reach source .*socket=", timeout=600)
                attempts = (await self.h.activity_attempts(name)).get("copy_disk", {})
                r.notes["copy_attempts"] = attempts.get("max_attempt")
        finally:
            srv.stop()
        return r

    async def _copy_failed(self, name: str):
        for p in await self.h.pending_copy(name):
            if p["attempt"] > 1 and p["message"]:
                return {"attempt": p["attempt"], "type": p["failure"], "message": p["message"]}
        return None

    async def source_restart(self, r: Result) -> Result:
        return await self._source_killed(r, "source-restart", comes_back=True)

    async def source_gone(self, r: Result) -> Result:
        return await self._source_killed(r, "source-gone", comes_back=False)

    async def target_full(self, r: Result) -> Result:
        tiny: LoopFs = self.h.tiny
        before = tiny.used_bytes()
        name = r.name = self.name("target-full")
        await self.h.migrate(name, [str(self.disk_a)], project="c-full", volume_type="tiny-ssd",
                             heartbeat_timeout_s=10, snapshot=False)
        r.faults.append("target-enospc")
        await self.ended(r, name, "c-full", "Failed", r"out of space")
        attempts = (await self.h.activity_attempts(name)).get("copy_disk", {})
        r.notes["copy_attempts"] = attempts.get("max_attempt")
        r.notes["copy_failures"] = [(f["type"], f["non_retryable"]) for f in attempts.get("failures", [])]
        after = tiny.used_bytes()
        r.notes["backend_used_mib"] = {"before": round(before / MiB, 1), "after": round(after / MiB, 1)}
        if after > before + MiB:
            r.leaks.append(f"space: the full backend still uses {(after - before) / MiB:.1f} MiB more than before")
            r.ok = False
        return r

    async def worker_kill(self, r: Result, i: int) -> Result:
        name = r.name = self.name(f"worker-kill-{i}")
        project = "c-kill"
        base = self.baseline_s or 10.0
        delay = self.rng.uniform(0.0, 0.9) * base  # somewhere in copy, verify or finalize
        await self.h.migrate(name, [str(self.disk_a)], project=project, volume_type="throttled-ssd",
                             heartbeat_timeout_s=4, snapshot=False)
        await asyncio.sleep(delay)  # the fault's random point in time, not a synchronisation
        killed_at = datetime.now(UTC)
        pid = self.h.kill_worker()
        r.faults.append("worker-sigkill")
        self.h.start_worker()
        await self.completed(r, name, [(self.want_a, SIZE)], project)
        r.notes["kill_after_admission_s"] = round(delay, 2)
        r.notes["killed_pid"] = pid
        r.notes["recovered_in_s"] = r.notes["closed_after_s"]  # from the restart to the end
        try:
            v = await self.h.view(name)
            r.notes["killed_in"] = step_at(v.history, killed_at)
        except Exception:
            pass
        return r

    async def worker_kill_snapshot(self, r: Result) -> Result:
        """The worker SIGKILLed while the post-migration snapshot (a copy of a 1 GiB volume full of
        data) runs: the next worker must finish the migration within SNAPSHOT_RECOVERY_S."""
        size = GiB
        img = await asyncio.to_thread(make_disk, self.h.src / "full.raw", size, [(0, size - 8192)], "raw", 8)
        want, _ = await asyncio.to_thread(source_sha256, img, self.h.src)
        name = r.name = self.name("worker-kill-snapshot")
        await self.h.migrate(name, [str(img)], project="c-ksnap", heartbeat_timeout_s=4, snapshot=True)
        v = await self.h.wait_view(name, lambda v: v.step == "Snapshot" or v.phase.terminal, 600, "step Snapshot",
                                   interval=0.05)
        if v.step != "Snapshot":
            r.outcome, r.detail = "error", f"the migration passed Snapshot unseen ({v.phase.value}/{v.step})"
            return r
        self.h.kill_worker()
        r.faults.append("worker-sigkill")
        self.h.start_worker()
        try:
            await self.completed(r, name, [(want, size)], "c-ksnap", timeout=SNAPSHOT_RECOVERY_S)
        finally:
            img.unlink(missing_ok=True)
        return r

    async def server_kill(self, r: Result) -> Result:
        name = r.name = self.name("server-kill")
        await self.h.migrate(name, [str(self.disk_a)], project="c-srv", volume_type="throttled-ssd",
                             heartbeat_timeout_s=10, snapshot=False)
        await self.h.wait_view(name, lambda v: v.disks[0].bytes_copied >= 32 * MiB, 180, "32 MiB copied")
        await asyncio.to_thread(self.h.restart_server)
        r.faults.append("temporal-sigkill-restart")
        return await self.completed(r, name, [(self.want_a, SIZE)], "c-srv")

    async def cancel_reserve(self, r: Result) -> Result:
        name = r.name = self.name("cancel-reserve")
        lock = self.h.hold_store_lock()
        r.faults.append("store-lock-held")
        try:
            await self.h.start_without_admission(name, [str(self.disk_a)], project="c-cr", snapshot=False)
            await self.h.wait_view(name, lambda v: v.step == "Reserve", 120, "step Reserve")
            await self.h.cancel(name)
            r.faults.append("cancel")
        finally:
            lock.rollback()
            lock.close()
        return await self.ended(r, name, "c-cr", "Cancelled", r"^cancelled by request$")

    async def cancel_fullsync(self, r: Result) -> Result:
        name = r.name = self.name("cancel-fullsync")
        await self.h.migrate(name, [str(self.disk_a)], project="c-cf", volume_type="throttled-ssd", snapshot=False)
        await self.h.wait_view(name, lambda v: v.phase.value == "FullSync" and v.disks[0].bytes_copied >= 16 * MiB,
                               180, "FullSync with 16 MiB copied")
        await self.h.cancel(name)
        r.faults.append("cancel")
        return await self.ended(r, name, "c-cf", "Cancelled", r"^cancelled by request$")

    async def _warm(self, scenario: str, seed: int) -> tuple[str, Path]:
        img = await asyncio.to_thread(make_disk, self.h.src / f"{scenario}.qcow2", SIZE, REGIONS, "qcow2", seed)
        name = self.name(scenario)
        await self.h.migrate(name, [str(img)], project=f"c-{scenario}"[:63], volume_type="throttled-ssd",
                             mode="warm", sync_interval_s=3600, heartbeat_timeout_s=10, snapshot=False)
        await self.h.wait_view(name, lambda v: v.phase.value == "Ready", 240, "Ready")
        return name, img

    async def cancel_ready(self, r: Result) -> Result:
        name, img = await self._warm("cancel-ready", 5)
        r.name = name
        await self.h.cancel(name)
        r.faults.append("cancel")
        return await self.ended(r, name, "c-cancel-ready", "Cancelled", r"^cancelled by request$", [img])

    async def cancel_syncing(self, r: Result) -> Result:
        name, img = await self._warm("cancel-syncing", 6)
        r.name = name
        await asyncio.to_thread(qemu_io, img, "write -P 7 8M 160M")
        await self.h.sync_now(name)
        await self.h.wait_view(name, lambda v: v.phase.value == "Syncing" and v.disks[0].generation == 1
                               and v.disks[0].bytes_copied >= 16 * MiB, 180, "Syncing with 16 MiB copied")
        await self.h.cancel(name)
        r.faults.append("cancel")
        return await self.ended(r, name, "c-cancel-syncing", "Cancelled", r"^cancelled by request$", [img])

    async def cbt_lost(self, r: Result) -> Result:
        name, img = await self._warm("cbt-lost", 7)
        r.name = name
        await asyncio.to_thread(qemu_io, img, "write -P 9 1M 1M")
        await asyncio.to_thread(_qemu_img, "bitmap", "--remove", str(img), "xms-1")
        r.faults.append("bitmap-removed")
        await self.h.sync_now(name)
        v = await self.h.wait_view(name, lambda v: v.syncs_failed >= 1 and v.phase.value == "Ready", 180,
                                   "the sync to fail")
        err = v.last_sync.error if v.last_sync else None
        r.notes["sync_error"] = err
        copy = (await self.h.activity_attempts(name)).get("copy_disk", {})
        fails = [f for f in copy.get("failures", []) if f["type"] == "ChangeTrackingLost"]
        r.notes["copy_failures"] = [(f["type"], f["non_retryable"], f["attempt"]) for f in copy.get("failures", [])]
        await self.h.cancel(name)
        r.faults.append("cancel")
        await self.ended(r, name, "c-cbt-lost", "Cancelled", r"^cancelled by request$", [img])
        if not clear_reason(err, r"full sync is needed"):
            r.detail = (r.detail + "; " if r.detail else "") + f"sync error is not a clear line: {err!r}"
        if not fails or any(not f["non_retryable"] or f["attempt"] != 1 for f in fails):
            r.detail = (r.detail + "; " if r.detail else "") + f"ChangeTrackingLost was not a first-attempt, non-retryable failure: {r.notes['copy_failures']}"
        r.reason = err
        r.ok = not r.detail
        return r


def _qemu_img(*args: str) -> None:
    import subprocess

    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=120)


def clear_reason(reason: str | None, pattern: str) -> bool:
    return bool(reason) and "\n" not in reason and "Traceback" not in reason and len(reason) <= 500 \
        and re.search(pattern, reason) is not None


def step_at(history, when: datetime) -> str:
    """The phase/step the migration was in at ``when`` (from its state's history)."""
    cur = "before Validate"
    for phase, step, at in history:
        t = datetime.fromisoformat(at)
        if t <= when:
            cur = f"{phase}/{step}"
    return cur


# --------------------------------------------------------------------------- runner


async def run(short: bool, runs: int | None, seed: int, root: Path, log, only: set[str] | None = None) -> dict:
    h = Harness(root, log=log)
    t_start = time.monotonic()
    results: list[Result] = []
    final_leaks: list[str] = []
    kill_runs = runs if runs is not None else (KILL_RUNS_SHORT if short else KILL_RUNS_FULL)
    try:
        await h.start()
        c = Chaos(h, seed, tag=f"{os.getpid() % 10000}")
        await c.prepare()
        plan: list[tuple[str, str, Callable[[Result], Awaitable[Result]]]] = [
            ("baseline", "completed", c.baseline),
            ("nbd-error", "completed", c.nbd_error),
            ("nbd-delay", "completed", c.nbd_delay),
            ("source-restart", "completed", c.source_restart),
            *([] if short else [("source-gone", "failed", c.source_gone)]),
            ("target-full", "failed", c.target_full),
            *[(f"worker-kill-{i}", "completed", lambda r, i=i: c.worker_kill(r, i)) for i in range(1, kill_runs + 1)],
            *([] if short else [("worker-kill-snapshot", "completed", c.worker_kill_snapshot)]),
            ("server-kill", "completed", c.server_kill),
            ("cancel-reserve", "cancelled", c.cancel_reserve),
            ("cancel-fullsync", "cancelled", c.cancel_fullsync),
            ("cancel-ready", "cancelled", c.cancel_ready),
            ("cancel-syncing", "cancelled", c.cancel_syncing),
            ("cbt-lost", "cancelled", c.cbt_lost),
        ]
        for scenario, expect, fn in plan:
            if only and scenario not in only and scenario.rsplit("-", 1)[0] not in only:
                continue
            r = Result(scenario=scenario, expect=expect)
            t0 = time.monotonic()
            log(f"chaos: {scenario} …")
            try:
                await fn(r)
            except Hung as e:
                r.outcome, r.detail = "hung", str(e)
            except Exception as e:
                r.outcome, r.detail = "error", f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
            r.duration_s = round(time.monotonic() - t0, 1)
            if r.outcome in ("hung", "error"):
                r.ok = False
                if r.name:
                    try:
                        if await h.execution_status(r.name) == "RUNNING":
                            r.leaks.append(f"workflow: {r.name} still running")
                            await h.terminate(r.name, r.detail)
                    except Exception:
                        pass
            try:
                r.leaks += await h.global_leaks()
            except Exception as e:
                r.leaks.append(f"leak check failed: {type(e).__name__}: {e}")
            if r.outcome != expect and not r.detail:
                r.detail = f"ended {r.outcome}, expected {expect}"
            r.ok = r.ok and r.outcome == expect and not r.leaks
            if not r.ok and scenario in KNOWN_BUGS and r.outcome == KNOWN_BUGS[scenario][0]:
                r.known_bug = KNOWN_BUGS[scenario][1]
            results.append(r)
            log(f"chaos: {scenario}: {r.outcome}{' ✓' if r.ok else ' ✗ ' + r.detail}"
                f"{'' if not r.leaks else ' LEAKS: ' + '; '.join(r.leaks)} ({r.duration_s}s)"
                f"{'' if not r.reason else ' — ' + r.reason}")
        try:
            final_leaks = [f"workflow: {n} still running" for n in await h.running_workflows()]
        except Exception as e:
            final_leaks = [f"workflows: cannot list running workflows: {e}"]
    except Exception as e:
        log(traceback.format_exc())
        results.append(Result(scenario="harness", expect="completed", outcome="error", detail=f"{type(e).__name__}: {e}"))
    finally:
        await h.close()
    return summarize(results, final_leaks, short, seed, kill_runs, time.monotonic() - t_start)


def summarize(results: list[Result], final_leaks: list[str], short: bool, seed: int, kill_runs: int,
              duration: float) -> dict:
    faults = Counter(f for r in results for f in r.faults)
    known = [r for r in results if r.known_bug]
    leaks = [leak for r in results if not r.known_bug for leak in r.leaks] + final_leaks
    unexpected = [f"{r.scenario}: {r.detail or r.outcome}" for r in results
                  if not r.ok and not r.known_bug and (r.detail or r.outcome != r.expect)]
    return {
        "mode": "short" if short else "full",
        "seed": seed,
        "worker_kill_runs": kill_runs,
        "duration_s": round(duration, 1),
        "runs": len(results),
        "faults_injected": dict(sorted(faults.items())),
        "faults_total": sum(faults.values()),
        "completed_with_matching_hashes": sum(r.outcome == "completed" and bool(r.hashes_equal) for r in results),
        "failed_with_clear_reason": sum(r.outcome == "failed" and r.ok for r in results),
        "failure_reasons": [f"{r.scenario}: {r.reason}" for r in results if r.outcome == "failed"],
        "cancelled_clean": sum(r.outcome == "cancelled" and r.ok for r in results),
        "worker_kills_mid_migration": sum(bool(r.notes.get("killed_in")) and not r.notes["killed_in"].startswith("Completed")
                                          for r in results if re.fullmatch(r"worker-kill-\d+", r.scenario)),
        "worker_kills_by_step": dict(Counter(r.notes.get("killed_in", "?") for r in results
                                             if re.fullmatch(r"worker-kill-\d+", r.scenario))),
        "unexpected": unexpected,
        "known_product_bugs": [f"{r.scenario}: {r.detail} — {r.known_bug}" for r in known],
        "known_bugs_fixed": [f"{r.scenario}: passes now; remove it from KNOWN_BUGS" for r in results
                             if r.ok and r.scenario in KNOWN_BUGS],
        "leaks": leaks,
        "leak_count": len(leaks),
        "ok": not unexpected and not leaks and all(r.ok or r.known_bug for r in results),
        "scenarios": [asdict(r) for r in results],
    }


def print_summary(s: dict, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)
    p("")
    p(f"chaos summary ({s['mode']}, seed {s['seed']}, {s['duration_s']:.0f}s)")
    p(f"  runs:                             {s['runs']}")
    p(f"  faults injected:                  {s['faults_total']}  "
      + ", ".join(f"{k} {v}" for k, v in s["faults_injected"].items()))
    p(f"  completed with matching hashes:   {s['completed_with_matching_hashes']}")
    p(f"  failed with clear reasons:        {s['failed_with_clear_reason']}")
    for reason in s["failure_reasons"]:
        p(f"      {reason}")
    p(f"  cancelled, nothing left:          {s['cancelled_clean']}")
    if s["worker_kill_runs"]:
        p(f"  worker kills mid-migration:       {s['worker_kills_mid_migration']}/{s['worker_kill_runs']}  "
          + ", ".join(f"{k} {v}" for k, v in sorted(s["worker_kills_by_step"].items())))
    p(f"  leaks found:                      {s['leak_count']}")
    for leak in s["leaks"]:
        p(f"      {leak}")
    p(f"  unexpected outcomes:              {len(s['unexpected'])}")
    for u in s["unexpected"]:
        p(f"      {u}")
    if s["known_product_bugs"] or s["known_bugs_fixed"]:
        p(f"  known product bugs reproduced:    {len(s['known_product_bugs'])}")
        for u in s["known_product_bugs"] + s["known_bugs_fixed"]:
            p(f"      {u}")
    p(f"  result:                           {'OK' if s['ok'] else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help=f"{KILL_RUNS_SHORT} worker kills, no source-gone wait")
    ap.add_argument("--runs", type=int, default=None, help="worker-kill runs (default 20, --short 3)")
    ap.add_argument("--seed", type=int, default=6, help="seed of the kill points")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here as JSON")
    ap.add_argument("--dir", type=Path, default=None, help="working directory (default /var/tmp/xms-chaos-PID)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (data, logs)")
    ap.add_argument("--strict", action="store_true", help="known product bugs fail the run too")
    ap.add_argument("--only", default="", help="comma-separated scenarios to run (worker-kill = all kills)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("chaos.run: must run as root (it loop-mounts a small filesystem for the out-of-space fault)",
              file=sys.stderr)
        return 2
    root = a.dir or Path(f"/var/tmp/xms-chaos-{os.getpid()}")
    root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    only = {x.strip() for x in a.only.split(",") if x.strip()} or None
    s = asyncio.run(run(a.short, a.runs, a.seed, root, log, only))
    s["dir"] = str(root)
    if a.strict and s["known_product_bugs"]:
        s["ok"] = False
    print_summary(s)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(s, indent=2, default=str))
    if not a.keep and s["ok"]:
        shutil.rmtree(root, ignore_errors=True)
    elif not s["ok"]:
        print(f"working directory kept for inspection: {root}", file=sys.stderr)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # sdk-python #300: a process that ran a Temporal client can abort at exit
