"""Guest tools (activities/guest.py) against a real Debian 12 guest image, under software
emulation: inspect, virt-v2v-in-place conversion, first boot seen on the serial console.

The images come from scripts/guest/build.sh (cached in $XMS_GUEST_DIR, /var/tmp/xms-guest by
default; the first build takes ~2 min). Missing tools are installed by scripts/guest/setup.sh
rather than skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from activities import guest
from tests.conftest import crash_qemu
from xms.models import MiB
from xms.errors import XmsError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts" / "guest"
SCRATCH = Path(os.environ.get("XMS_GUEST_DIR", "/var/tmp/xms-guest"))
TOOLS = ("virt-v2v-in-place", "qemu-system-x86_64", "guestfish", "debootstrap", "sfdisk")


def _tools_ready() -> bool:
    if not all(shutil.which(t) for t in TOOLS):
        return False
    return subprocess.run(["/usr/bin/python3", "-c", "import guestfs"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def images() -> tuple[Path, Path]:
    if not _tools_ready():
        subprocess.run([str(SCRIPTS / "setup.sh")], check=True, timeout=900)
    p = subprocess.run([str(SCRIPTS / "build.sh")], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"build.sh failed: {p.stderr.strip().splitlines()[-1:]}"
    img, data = (Path(x) for x in p.stdout.split())
    assert img.is_file() and data.is_file()
    return img, data


@pytest.fixture
def scratch() -> Path:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="test-", dir=SCRATCH))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _alive_with(text: str) -> list[int]:
    """Pids whose command line contains ``text``."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def test_libguestfs_env_is_software_emulation():
    env = guest.libguestfs_env()
    assert env["LIBGUESTFS_BACKEND"] == "direct"
    assert env["LIBGUESTFS_BACKEND_SETTINGS"] == "force_tcg"  # XMS_GUEST_ACCEL unset: tcg
    assert guest.accel() == "tcg"


@pytest.mark.timeout(1500)
def test_inspect_os_disk_and_data_disk(images):
    img, data = images
    os_disk = guest.inspect([str(img)])
    assert os_disk.os_type == "linux" and os_disk.distro == "debian"
    assert os_disk.firmware == "bios"
    assert os_disk.root_device == "/dev/sda1"
    assert os_disk.hostname == "xms-guest" and os_disk.major_version == 12
    assert os_disk.is_data_disk is False

    data_disk = guest.inspect([str(data)])
    assert data_disk.is_data_disk is True
    assert data_disk.os_type is None and data_disk.firmware is None and data_disk.root_device is None


def test_inspect_unreadable_disk_is_one_clear_error(scratch):
    with pytest.raises(guest.GuestInspectionFailed, match="No such file"):
        guest.inspect([str(scratch / "missing.img")], timeout_s=120)


@pytest.mark.timeout(2400)
def test_convert_copy_then_first_boot_prints_marker(images, scratch):
    img, _ = images
    disk = scratch / "boot.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(disk)], check=True)

    # MODULES=dep for the conversion only: the initramfs rebuild inside the TCG appliance is
    # the slow part (see scripts/guest/NOTES.md); the override is removed again afterwards.
    report = guest.convert([str(disk)], timeout_s=1500, log_path=str(scratch / "v2v.log"),
                           initramfs_modules="dep")
    assert report.guest and any(s.message.startswith("Converting") for s in report.steps), report
    assert report.steps[-1].message == "Finishing off"
    assert report.initramfs_override == "dep" and report.override_seconds > 0
    assert not report.warnings or all("override" not in w for w in report.warnings), report.warnings
    v2v_log = (scratch / "v2v.log").read_text(errors="replace")
    # It really converted: virtio modules listed for initramfs-tools and the initramfs rebuilt.
    assert "added by virt-v2v" in v2v_log and ".pre-v2v" in v2v_log
    assert 'command "/usr/sbin/update-initramfs' in v2v_log
    print(f"convert: {report.seconds} s (+{report.override_seconds} s override); "
          f"steps: {[(s.at_s, s.message) for s in report.steps]}")

    serial = scratch / "serial.log"
    took = guest.boot([str(disk)], timeout_s=600, serial_log=str(serial))
    print(f"boot: marker after {took:.1f} s")
    assert 0 < took < 600
    assert "XMS-BOOT-OK xms-guest" in serial.read_text(errors="replace")
    assert not _alive_with(str(serial)), "qemu still running after boot() returned"


def test_failing_converter_raises_with_its_error_line(scratch, monkeypatch):
    fake = scratch / "fake-v2v"
    args_file = scratch / "args"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {args_file}\n'
        'echo "[   0.0] Setting up the source: -i disk $5"\n'
        'echo "[   1.0] Opening the source"\n'
        'echo "virt-v2v-in-place: error: inspection could not detect the source guest (or physical machine)."\n'
        'echo ""\n'
        'echo "Assuming that you are running virt-v2v/virt-p2v on a source which is supported" >&2\n'
        "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("XMS_V2V_COMMAND", str(fake))
    disk = scratch / "disk.img"
    disk.write_bytes(b"\0" * 4096)

    with pytest.raises(guest.GuestConversionFailed) as e:
        guest.convert([str(disk)], timeout_s=60)
    err = e.value
    assert isinstance(err, XmsError) and err.type == "GuestConversionFailed" and err.retryable is False
    assert str(err).startswith(
        "virt-v2v-in-place: error: inspection could not detect the source guest (or physical machine).")
    assert "[exit 1]" in str(err) and "Assuming" not in str(err)
    assert args_file.read_text().split() == ["-i", "disk", "-if", "raw", str(disk)]


def test_launch_failures_are_told_apart_from_conversion_errors():
    ci = ("[    1.075459] pci 0000:00:04.0: BAR 1 [mem 0xfebc2000-0xfebc2fff]\n"
          "libguestfs: child_cleanup: 0x55944f95cf80: child process died\n"
          "libguestfs: trace: v2v: launch = -1 (error)\n"
          "virt-v2v-in-place: error: libguestfs error: guestfs_launch failed, see earlier error messages\n")
    assert guest._launch_failure(ci) == "the appliance's qemu died while it was starting"
    lock = ("qemu-system-x86_64: -drive file=x: Failed to get shared \"write\" lock\n"
            "virt-v2v-in-place: error: libguestfs error: guestfs_launch failed, see earlier error messages\n")
    assert guest._launch_failure(lock).startswith("qemu-system-x86_64: -drive file=x: Failed to get")
    assert guest._launch_failure("virt-v2v-in-place: error: inspection could not detect the source guest\n") is None


@pytest.mark.timeout(300)
def test_appliance_dying_at_launch_is_a_retryable_emulator_failure(scratch, monkeypatch):
    """qemu segfaulting while the appliance boots (seen once in CI: TCG, kernel probing PCI) is
    the host's fault, not the guest's: EmulatorFailed, retryable, with what happened."""
    disk = scratch / "disk.img"
    disk.write_bytes(b"\0" * MiB)
    log = scratch / "v2v.log"
    needle = f"XMS_TEST_CRASH={uuid.uuid4().hex}"
    monkeypatch.setenv(*needle.split("="))
    # the appliance itself, not the capability probes libguestfs runs qemu for first
    with crash_qemu(needle, "guestfs_identifier=") as hit, pytest.raises(guest.EmulatorFailed) as e:
        guest.convert([str(disk)], timeout_s=240, log_path=str(log))
    assert hit.get("pid"), "the appliance's qemu never appeared"
    err = e.value
    assert err.type == "EmulatorFailed" and err.retryable is True
    assert str(err).startswith("virt-v2v-in-place could not start the libguestfs appliance: "), str(err)
    assert "[exit 1]" in str(err)
    assert "guestfs_launch failed" in log.read_text()


@pytest.mark.timeout(300)
def test_boot_check_qemu_killed_by_a_signal_is_a_retryable_emulator_failure(images, scratch):
    _, data = images
    serial = scratch / "serial.log"
    with crash_qemu(str(serial)) as hit, pytest.raises(guest.EmulatorFailed, match="qemu died of signal SIGSEGV"):
        guest.boot([str(data)], timeout_s=120, serial_log=str(serial), snapshot=True)
    assert hit.get("pid")
    assert not _alive_with(str(serial)), "qemu still running after boot() raised"


def test_converter_timeout_kills_everything_it_started(scratch, monkeypatch):
    fake = scratch / "slow-v2v"
    pidfile = scratch / "child.pid"
    # The child leaves the process group the way libguestfs' qemu appliance does.
    fake.write_text(
        "#!/bin/sh\n"
        'echo "[   0.0] Opening the source"\n'
        f"setsid sleep 300 & echo $! > {pidfile}\n"
        "sleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setenv("XMS_V2V_COMMAND", str(fake))
    t0 = time.monotonic()
    with pytest.raises(guest.GuestConversionFailed, match="did not finish within 2 s.*Opening the source"):
        guest.convert([str(scratch / "disk.img")], timeout_s=2)
    assert time.monotonic() - t0 < 30
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {pid} of the timed-out converter is still running")


@pytest.mark.timeout(300)
def test_boot_without_marker_fails_with_serial_tail_and_kills_qemu(images, scratch):
    _, data = images
    serial = scratch / "serial.log"
    with pytest.raises(guest.GuestBootFailed, match="no 'XMS-BOOT-OK' on the serial console within 15 s"):
        guest.boot([str(data)], timeout_s=15, serial_log=str(serial), snapshot=True)
    assert not _alive_with(str(serial)), "qemu still running after boot() raised"
