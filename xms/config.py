"""The embedded store's configuration file: backends, volume types and quotas, validated."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xms.errors import ConfigInvalid
from xms.models import QoS, VolumeTypeInfo

QUOTA_KEY_RE = re.compile(r"^(volumes|gigabytes)(_[A-Za-z0-9._-]+)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfig(_Strict):
    path: str
    availability_zone: str = Field(min_length=1)


class VolumeTypeConfig(_Strict):
    backend: str
    description: str = ""
    qos: QoS = QoS()
    encrypted: bool = False
    granularity_gib: int = Field(1, ge=1, le=1024)


class QuotaConfig(_Strict):
    default: dict[str, int] = {"volumes": 100, "gigabytes": 2000}
    projects: dict[str, dict[str, int]] = {}

    @field_validator("default")
    @classmethod
    def _keys(cls, v: dict[str, int]) -> dict[str, int]:
        check_quota_limits(v)
        return v

    @field_validator("projects")
    @classmethod
    def _pkeys(cls, v: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for limits in v.values():
            check_quota_limits(limits)
        return v


class XmsConfig(_Strict):
    backends: dict[str, BackendConfig] = Field(min_length=1)
    volume_types: dict[str, VolumeTypeConfig] = Field(min_length=1)
    quotas: QuotaConfig = QuotaConfig()
    # named commands the worker may run (e.g. PowerOffSource). Requests name a hook, never carry a
    # command: nothing a Temporal client sends is executed, and no credential enters history.
    # Arguments may use {migration} and {source}.
    hooks: dict[str, list[str]] = {}

    @field_validator("hooks")
    @classmethod
    def _hooks(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, argv in v.items():
            if not argv or not argv[0]:
                raise ValueError(f"hook {name!r} needs a command: a list such as [virsh, shutdown, '{{migration}}']")
        return v

    def hook(self, name: str, **values: str) -> list[str]:
        if name not in self.hooks:
            known = ", ".join(sorted(self.hooks)) or "none are configured"
            raise ConfigInvalid(f"unknown hook {name!r}; configured hooks: {known}")
        return [a.format(**values) for a in self.hooks[name]]

    @model_validator(mode="after")
    def _refs(self) -> "XmsConfig":
        for name, vt in self.volume_types.items():
            if vt.backend not in self.backends:
                raise ValueError(
                    f"volume type {name!r} names backend {vt.backend!r}; "
                    f"defined backends: {', '.join(sorted(self.backends))}"
                )
        return self

    def volume_type(self, name: str) -> VolumeTypeInfo:
        vt = self.volume_types[name]
        return VolumeTypeInfo(
            name=name,
            backend=vt.backend,
            availability_zone=self.backends[vt.backend].availability_zone,
            qos=vt.qos,
            encrypted=vt.encrypted,
            granularity_gib=vt.granularity_gib,
            description=vt.description,
        )

    def all_volume_types(self) -> list[VolumeTypeInfo]:
        return [self.volume_type(n) for n in sorted(self.volume_types)]

    def backend_dir(self, backend: str, data_dir: Path) -> Path:
        p = Path(self.backends[backend].path)
        return p if p.is_absolute() else data_dir / p


def check_quota_limits(limits: dict[str, int]) -> None:
    for key, value in limits.items():
        if not QUOTA_KEY_RE.match(key):
            raise ValueError(
                f"unknown quota key {key!r}; allowed: volumes, gigabytes, volumes_<type>, gigabytes_<type>"
            )
        if value < -1:
            raise ValueError(f"quota {key}={value} is invalid; allowed: -1 (unlimited) or a count >= 0")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "top level"
    return f"{where}: {err['msg']}"


def load_config(path: Path | None) -> XmsConfig:
    """Load and validate the config; any problem becomes one ConfigInvalid line naming file and field."""
    if path is None:
        text = resources.files("xms").joinpath("defaults/config.yaml").read_text()
        where = "built-in config"
    else:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigInvalid(f"config {where}: cannot read it: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigInvalid(f"config {where}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigInvalid(f"config {where}: expected a mapping with backends, volume_types and quotas")
    try:
        return XmsConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigInvalid(f"config {where}: {_first_error(e)}") from None
