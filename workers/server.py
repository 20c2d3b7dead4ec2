"""``xms server``: the embedded stack — Temporal dev server, a worker, the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import signal
from contextlib import asynccontextmanager

from prometheus_client import start_http_server

from workers.devserver import DevServer, check_port_free
from workers.worker import run_worker
from xms import telemetry
from xms.settings import Settings

log = telemetry.get_logger(component="server")


@asynccontextmanager
async def embedded(settings: Settings, *, start_temporal: bool, metrics: bool = True):
    """Start what xms needs on this machine; stop all of it on exit (or SIGTERM / Ctrl-C)."""
    host, port = settings.temporal_address.rsplit(":", 1)
    dev = None
    if metrics:
        check_port_free("127.0.0.1", settings.metrics_port, "Prometheus metrics")
    if start_temporal:
        dev = DevServer(host=host, port=int(port), ui_port=settings.ui_port,
                        db_file=settings.data_dir / "temporal.db", log_file=settings.data_dir / "temporal.log")
        await asyncio.to_thread(dev.start)
        log.info("temporal dev server started", address=dev.address, ui=settings.ui_url, db=str(dev.db_file))
    stop = asyncio.Event()
    worker_task = None
    try:
        if metrics:
            start_http_server(settings.metrics_port, addr="127.0.0.1")
            log.info("metrics endpoint", url=f"http://127.0.0.1:{settings.metrics_port}/metrics")
        worker_task = asyncio.create_task(run_worker(settings, stop))
        yield stop, worker_task
    finally:
        stop.set()
        if worker_task:
            try:
                await asyncio.wait_for(worker_task, 30)
            except BaseException:  # the worker's own error was already raised to the caller
                pass
        if dev:
            await asyncio.to_thread(dev.stop)
            log.info("temporal dev server stopped")


async def serve(settings: Settings, *, start_temporal: bool) -> None:
    async with embedded(settings, start_temporal=start_temporal) as (stop, worker_task):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        done, _ = await asyncio.wait([worker_task, asyncio.create_task(stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if worker_task in done and worker_task.exception():
            raise worker_task.exception()
