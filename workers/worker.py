"""The xms worker: polls the shared queue (workflows, validation) and this host's queue (disks)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities import copyengine
from activities.blockstorage import open_store
from activities.migration import MigrationActivities
from workflows.migration import MigrationWorkflow
from xms import telemetry
from xms.models import MiB, Phase
from xms.settings import Settings

log = telemetry.get_logger(component="worker")


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address, namespace=settings.namespace, data_converter=settings.data_converter
    )


async def ensure_search_attributes(client: Client, settings: Settings) -> None:
    """Register XmsPhase (Keyword) so migrations can be listed and counted by phase. Idempotent."""
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=settings.namespace,
                search_attributes={"XmsPhase": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD},
            )
        )
    except RPCError as e:
        if "already" not in str(e).lower():
            log.warning("cannot register search attribute XmsPhase", error=str(e))


async def count_phases(client: Client, every: float = 15.0) -> None:
    """Keep xms_migrations{phase} in step with Temporal's visibility store."""
    while True:
        for phase in Phase:
            try:
                c = await client.count_workflows(f"WorkflowType='MigrationWorkflow' AND XmsPhase='{phase.value}'")
                telemetry.MIGRATIONS.labels(phase.value).set(c.count)
            except RPCError:
                pass
        await asyncio.sleep(every)  # periodic refresh, not synchronisation


def build_worker(client: Client, settings: Settings, executor: ThreadPoolExecutor) -> list[Worker]:
    acts = MigrationActivities(settings, open_store(settings))
    common = dict(activity_executor=executor, max_concurrent_activities=32,
                  graceful_shutdown_timeout=timedelta(seconds=5),
                  sticky_queue_schedule_to_start_timeout=timedelta(seconds=3),
                  max_heartbeat_throttle_interval=timedelta(seconds=2),
                  default_heartbeat_throttle_interval=timedelta(seconds=2))
    shared = Worker(client, task_queue=settings.task_queue, workflows=[MigrationWorkflow],
                    activities=[acts.validate], **common)
    host = Worker(client, task_queue=settings.effective_host_queue, activities=acts.all(), **common)
    return [shared, host]


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    client = await connect(settings)
    await ensure_search_attributes(client, settings)
    copyengine.set_buffer_budget(settings.copy_buffer_mib * MiB)
    with ThreadPoolExecutor(max_workers=40, thread_name_prefix="xms-activity") as executor:
        workers = build_worker(client, settings, executor)
        counter = asyncio.create_task(count_phases(client))
        log.info("worker started", temporal=settings.temporal_address, task_queue=settings.task_queue,
                 host_queue=settings.effective_host_queue)
        try:
            async with workers[0], workers[1]:
                await stop.wait()
        finally:
            counter.cancel()
        log.info("worker stopped")
