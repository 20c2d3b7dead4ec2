"""Logs (structlog key/values) and metrics (prometheus-client, all named xms_*)."""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import Counter, Gauge, Histogram

BYTES_COPIED = Counter("xms_bytes_copied_total", "Data bytes written to targets", ["volume_type"])
BYTES_READ = Counter("xms_bytes_read_total", "Bytes read from sources", ["volume_type"])
ZERO_BYTES_SKIPPED = Counter("xms_zero_bytes_skipped_total", "Bytes that were zero and not transferred", ["volume_type"])
COPY_THROUGHPUT = Gauge("xms_copy_throughput_bytes", "Current copy throughput, bytes/s", ["migration", "disk"])
COPY_DURATION = Histogram(
    "xms_copy_duration_seconds", "Duration of disk copy activities", buckets=(1, 5, 15, 60, 300, 900, 3600, 14400)
)
ACTIVITY_FAILURES = Counter("xms_activity_failures_total", "Activity attempts that raised", ["activity", "error_type"])
MIGRATIONS = Gauge("xms_migrations", "Migrations by phase (from Temporal visibility)", ["phase"])
RESUMES = Counter("xms_copy_resumes_total", "Copies that resumed from a heartbeated offset")

_configured = False


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    global _configured
    if _configured:
        return
    _configured = True
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    renderer = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(**bind) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("xms").bind(**bind)
