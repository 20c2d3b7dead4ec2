"""Static checks on docker-compose.temporal.yml, the self-hosted Temporal cluster for xms.

No Docker engine is needed: the file is parsed with PyYAML. A further test asks
`docker compose config -q` to validate it when the compose plugin is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.temporal.yml"
SERVICES = ("postgresql", "temporal", "temporal-admin-tools", "temporal-ui")
TEMPORAL_ADDRESS = "temporal:7233"


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    """A service's environment as a dict, whether it is written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _published_ports(service: dict) -> set[int]:
    """Host ports a service publishes, from short ("[ip:]host:container") or long syntax."""
    out: set[int] = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if "published" in port:
                out.add(int(str(port["published"]).split("-")[0]))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) >= 2:  # a bare "7233" would publish on a random host port
            out.add(int(parts[-2]))
    return out


def test_expected_services_exist(services: dict) -> None:
    for name in SERVICES:
        assert name in services, f"missing service {name!r}"


@pytest.mark.parametrize("name", SERVICES)
def test_image_is_pinned(services: dict, name: str) -> None:
    image = services[name]["image"]
    assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{name}: {image!r} has no tag"
    tag = image.rsplit("/", 1)[-1].split("@")[0].partition(":")[2]
    assert tag and tag != "latest", f"{name}: {image!r} is not pinned"
    assert "${" not in image, f"{name}: {image!r} depends on an environment variable"


def test_temporal_publishes_frontend_port(services: dict) -> None:
    assert 7233 in _published_ports(services["temporal"])


def test_ui_publishes_8080(services: dict) -> None:
    assert 8080 in _published_ports(services["temporal-ui"])


def test_postgresql_has_healthcheck_and_volume(services: dict) -> None:
    pg = services["postgresql"]
    test = pg["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg.get("volumes") or [])


def test_temporal_waits_for_healthy_postgresql(services: dict) -> None:
    depends = services["temporal"]["depends_on"]
    assert isinstance(depends, dict), "use the long form so the condition is explicit"
    assert depends["postgresql"]["condition"] == "service_healthy"


def test_temporal_uses_postgres12(services: dict) -> None:
    env = _env(services["temporal"])
    assert env["DB"] == "postgres12"
    assert env["DB_PORT"] == "5432"
    assert env["POSTGRES_SEEDS"] == "postgresql"


@pytest.mark.parametrize("name", ["temporal-admin-tools", "temporal-ui"])
def test_clients_point_at_temporal(services: dict, name: str) -> None:
    assert _env(services[name])["TEMPORAL_ADDRESS"] == TEMPORAL_ADDRESS


def test_ui_has_cors_origins(services: dict) -> None:
    assert _env(services["temporal-ui"]).get("TEMPORAL_CORS_ORIGINS")


def test_admin_tools_is_interactive(services: dict) -> None:
    tools = services["temporal-admin-tools"]
    assert tools.get("stdin_open") is True
    assert tools.get("tty") is True


def test_all_services_share_one_network(compose: dict, services: dict) -> None:
    declared = set(compose.get("networks") or {})
    assert len(declared) == 1, f"expected one network, got {sorted(declared)}"
    (network,) = declared
    for name, service in services.items():
        nets = service.get("networks") or []
        assert network in nets, f"{name} is not on {network!r}"


def test_named_volumes_are_declared(compose: dict, services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for vol in service.get("volumes") or []:
            source = str(vol).split(":", 1)[0]
            if ":" in str(vol) and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} uses undeclared volume {source!r}"


def _compose_plugin_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        r = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.mark.skipif(not _compose_plugin_available(), reason="docker compose plugin is not installed")
def test_docker_compose_config_accepts_file() -> None:
    """Validate the file with `docker compose config -q`.

    Skipped only when the `docker` client or its compose plugin is missing.
    `config` works offline and needs no Docker engine, so if the plugin is
    installed this test runs on a machine without a daemon too.
    """
    r = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
