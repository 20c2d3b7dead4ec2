"""Process settings, from the environment (XMS_*) with defaults that run on one machine."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XMS_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path(os.path.expanduser("~/.local/share/xms")))
    config: Path | None = None  # volume types, backends, quotas; default: the shipped one
    temporal_address: str = "127.0.0.1:7233"
    namespace: str = "default"
    task_queue: str = "xms"
    host_queue: str | None = None  # activities that touch this host's disks; default xms-host-<hostname>
    metrics_port: int = 9464
    ui_port: int = 8233
    target: Literal["local", "openstack"] = "local"  # which block-storage adapter the worker uses
    # openstack: the clouds.yaml entry (openstacksdk's convention; default $OS_CLOUD). Only this
    # name travels in requests and history; credentials stay in clouds.yaml on the worker host.
    cloud: str | None = Field(default_factory=lambda: os.environ.get("OS_CLOUD"))
    payload_key: SecretStr | None = None  # encrypts every Temporal payload (see xms/codec.py)
    # buffers of every copy and checksum this worker runs at once (the budget they share)
    copy_buffer_mib: int = Field(default=96, ge=8, le=65536)
    log_format: str = "console"  # console | json
    log_level: str = "info"

    @property
    def data_converter(self):
        from xms.codec import data_converter

        return data_converter(self.payload_key.get_secret_value() if self.payload_key else None)

    @property
    def effective_host_queue(self) -> str:
        return self.host_queue or f"xms-host-{socket.gethostname()}"

    @property
    def run_dir(self) -> Path:
        """0700 directory for NBD sockets and other per-process runtime files."""
        d = self.data_dir / "run"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
        return d

    @property
    def ui_url(self) -> str:
        host = self.temporal_address.rsplit(":", 1)[0]
        return f"http://{host}:{self.ui_port}/namespaces/{self.namespace}/workflows"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
