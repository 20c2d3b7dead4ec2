"""Guest-side tools for cutover: inspect a disk, convert it in place with virt-v2v, verify it boots.

Plain synchronous functions (no Temporal imports): activities call them in a thread and turn
``XmsError`` subclasses into ApplicationErrors. Everything runs on the host that holds the
target volume's file (a raw image path), through subprocesses that are killed, with every
process they started, when a timeout expires.

Measured on this kind of machine (2 cores shared with other work, software emulation only:
/dev/kvm is a nested "PVM" KVM on which qemu ``-cpu host`` aborts and a stock kernel hangs
otherwise), with the test guest of ``scripts/guest/build.sh`` (Debian 12, 2 GiB raw, BIOS/grub)
— details and the commands in ``scripts/guest/NOTES.md``:

* ``inspect``: 22-28 s alone (appliance launch ~18 s), up to ~40 s on a busy machine; the same
  for an OS disk and a data-only disk.
* ``convert``: 108-150 s when the guest's initramfs-tools uses MODULES=list or dep (up to ~220 s
  on a busy machine); 724-792 s for the Debian default MODULES=most, because virt-v2v rebuilds
  the initramfs inside its TCG appliance — ``initramfs_modules="dep"`` brings that guest back
  to 150 s + 50 s for setting and removing the override.
* ``boot``: the marker appears 23-36 s after qemu starts (TCG, 512 MiB, virtio-blk).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, Field

from xms.errors import XmsError

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "guest"
V2V = "virt-v2v-in-place"
QEMU = "qemu-system-x86_64"
# The variable every child gets, so that a timeout can find and kill all of them — including
# qemu appliances libguestfs puts in their own process group and daemons that re-parent.
RUN_TOKEN_VAR = "XMS_GUEST_RUN"


class GuestConversionFailed(XmsError):
    """virt-v2v-in-place exited non-zero or did not finish in time; the message carries its own
    error line. The volume may be half-converted: retrying the same conversion cannot help."""

    type = "GuestConversionFailed"
    retryable = False


class GuestInspectionFailed(XmsError):
    """libguestfs could not open or inspect the disk(s) (unreadable image, wrong format, timeout)."""

    type = "GuestInspectionFailed"
    retryable = False


class GuestBootFailed(XmsError):
    """The converted guest did not print its boot marker on the serial console in time."""

    type = "GuestBootFailed"
    retryable = False


class EmulatorFailed(XmsError):
    """qemu on this host died before the guest ran: the libguestfs appliance failed to launch, or
    the boot check's qemu was killed by a signal. Nothing was written to the guest's disks (the
    appliance never came up; the boot check runs on a throw-away overlay), so the step is
    retried. Seen here: qemu 7.2's TCG segfaulting while the appliance kernel probed PCI, once
    in ~6 hours of tests."""

    type = "EmulatorFailed"
    retryable = True


class GuestInspection(BaseModel):
    os_type: str | None = None          # "linux", "windows", ... ; None: no operating system found
    distro: str | None = None           # "debian", "rhel", "windows", ...
    product_name: str | None = None
    major_version: int | None = None
    minor_version: int | None = None
    arch: str | None = None
    osinfo: str | None = None           # libosinfo short id, e.g. "debian12"
    hostname: str | None = None
    firmware: str | None = None         # "bios" | "uefi"; None for a data disk
    root_device: str | None = None      # in libguestfs naming: /dev/sda1 = 1st disk, 1st partition
    roots: list[str] = Field(default_factory=list)  # every root found (multi-boot), first is used
    is_data_disk: bool = False          # True when no operating system was found on any disk
    seconds: float = 0.0


class ConversionStep(BaseModel):
    at_s: float      # virt-v2v's own clock, seconds since it started
    message: str


class ConversionReport(BaseModel):
    seconds: float
    command: list[str]
    log_path: str | None = None
    guest: str | None = None            # "12.15" in "Converting 12.15 to run on KVM"
    steps: list[ConversionStep] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    initramfs_override: str | None = None  # MODULES= in force during the conversion, if any
    override_seconds: float = 0.0          # spent setting and removing that override


# --------------------------------------------------------------------------- environment

_kvm_probe: bool | None = None


def kvm_usable() -> bool:
    """True if qemu can run a ``-cpu host`` KVM guest for 2 s without aborting (cached).

    On this machine it cannot: the nested PVM KVM makes qemu abort ("failed to set MSR 0x10a"),
    so TCG is the default and KVM is only tried when ``XMS_GUEST_ACCEL=kvm`` asks for it."""
    global _kvm_probe
    if _kvm_probe is None:
        _kvm_probe = False
        if os.access("/dev/kvm", os.R_OK | os.W_OK) and shutil.which(QEMU):
            try:
                p = subprocess.run(
                    [QEMU, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "64",
                     "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    timeout=2)
                _kvm_probe = False if p.returncode else True
            except subprocess.TimeoutExpired:  # still running after 2 s: the vCPU works
                _kvm_probe = True
    return _kvm_probe


def accel() -> str:
    """"tcg" unless ``XMS_GUEST_ACCEL=kvm`` (or ``auto``) and :func:`kvm_usable`."""
    want = os.environ.get("XMS_GUEST_ACCEL", "tcg")
    return "kvm" if want in ("kvm", "auto") and kvm_usable() else "tcg"


def libguestfs_env() -> dict[str, str]:
    """Variables for libguestfs tools (guestfish, virt-inspector, virt-v2v*), to be merged over
    ``os.environ``: the direct backend (no libvirtd), software emulation unless KVM really works.

    ``LIBGUESTFS_MEMSIZE`` is left alone unless set by the caller: virt-v2v doubles the default
    1280 MiB itself, and memory size made no measurable difference under TCG. There is no
    environment variable for appliance vCPUs; virt-v2v already uses one per host core (2 here).
    """
    env = {"LIBGUESTFS_BACKEND": "direct"}
    if accel() == "tcg":
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    for k in ("LIBGUESTFS_MEMSIZE", "LIBGUESTFS_CACHEDIR", "LIBGUESTFS_TMPDIR"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


# --------------------------------------------------------------------------- processes


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


def _kill_run(proc: subprocess.Popen, token: str) -> None:
    """SIGKILL the process group of ``proc`` and every process carrying ``token`` in its
    environment (libguestfs starts qemu in a process group of its own)."""
    victims: set[int] = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if f"{RUN_TOKEN_VAR}={token}".encode() in f.read().split(b"\0"):
                    victims.add(int(d))
        except OSError:
            continue
    for sig_target in [("pg", proc.pid)] + [("pid", p) for p in victims]:
        try:
            if sig_target[0] == "pg":
                os.killpg(sig_target[1], signal.SIGKILL)
            else:
                os.kill(sig_target[1], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _run(cmd: list[str], *, env: dict[str, str], timeout_s: float, out) -> tuple[int | None, float]:
    """Run ``cmd`` in a new session writing stdout+stderr to ``out``; returns (exit status or
    None on timeout, seconds). On timeout everything it started is killed."""
    token = uuid.uuid4().hex
    full_env = {**os.environ, **env, RUN_TOKEN_VAR: token}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env=full_env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_run(proc, token)
        return None, time.monotonic() - t0
    except BaseException:  # interrupted (KeyboardInterrupt, thread cancellation): leave nothing behind
        _kill_run(proc, token)
        raise
    return rc, time.monotonic() - t0


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise XmsError(f"{tool} is not installed: run scripts/guest/setup.sh")
    return path


def _helper(script: str, args: list[str], *, timeout_s: float, what: str,
            error: type[XmsError]) -> tuple[dict, float]:
    """Run scripts/guest/SCRIPT (libguestfs' Python bindings under Debian's python3) and return
    its JSON answer and the seconds it took; ``error`` carries its one-line failure."""
    _need("python3")
    with tempfile.TemporaryFile() as out:
        rc, secs = _run(["/usr/bin/python3", str(SCRIPTS / script), *args],
                        env=libguestfs_env(), timeout_s=timeout_s, out=out)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if rc is None:
        raise error(f"{what} did not finish within {timeout_s:.0f} s")
    data = None
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                data = json.loads(line)
                break
            except ValueError:
                pass
    if data is None or rc != 0:
        why = (data or {}).get("error") or (text.strip().splitlines() or ["no output"])[-1]
        launch = _launch_failure(text)
        if launch:
            raise EmulatorFailed(f"{what} could not start the libguestfs appliance: {launch}")
        raise error(f"{what} failed: {why}")
    return data, secs


# --------------------------------------------------------------------------- inspect


def inspect(paths: list[str], fmt: str = "raw", *, timeout_s: float = 600) -> GuestInspection:
    """Inspect the disk(s) of one VM read-only with libguestfs: OS, distro, firmware, root.

    All disks are opened together (an OS may span them), in the order given; ``root_device``
    uses libguestfs names (/dev/sda = first path). ``is_data_disk`` is True when no operating
    system is found on any of them. Firmware follows virt-v2v's rule (an EFI System Partition
    on GPT and no BIOS boot partition -> "uefi", else "bios"); None for a data disk.

    Uses ``scripts/guest/inspect.py`` (libguestfs' Python bindings under Debian's python3, one
    appliance launch). Measured under TCG: 28 s for the test guest, 22 s for the data disk;
    ``virt-inspector`` takes as long (28 s / 19 s) but says nothing about firmware, and
    ``virt-v2v-inspector`` converts an overlay first (133 s for the guest; for the data disk it
    exits 1 after 20 s with "inspection could not detect the source guest").
    """
    if not paths:
        raise GuestInspectionFailed("no disks to inspect")
    data, secs = _helper("inspect.py", ["--format", fmt, *paths], timeout_s=timeout_s,
                         what=f"inspection of {', '.join(paths)}", error=GuestInspectionFailed)
    roots = data["roots"]
    if not roots:
        return GuestInspection(is_data_disk=True, seconds=round(secs, 1))
    r = roots[0]

    def known(v):
        return None if v in (None, "", "unknown") else v

    return GuestInspection(
        os_type=known(r["type"]), distro=known(r["distro"]), product_name=known(r["product_name"]),
        major_version=r["major"], minor_version=r["minor"], arch=known(r["arch"]),
        osinfo=known(r["osinfo"]), hostname=known(r["hostname"]), firmware=data["firmware"],
        root_device=r["root"], roots=[x["root"] for x in roots], is_data_disk=False,
        seconds=round(secs, 1))


# --------------------------------------------------------------------------- convert

_STEP_RE = re.compile(r"^\[\s*(\d+\.\d)\]\s+(\S.*)$")


def _launch_failure(text: str) -> str | None:
    """When libguestfs could not launch its appliance: why, in one phrase (qemu's own lines if it
    printed any, else how the appliance went away); None for any other output."""
    if "guestfs_launch failed" not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines()]
    qemu = [ln for ln in lines if ln.startswith("qemu-system-") or ln.startswith("libguestfs: error:")]
    if qemu:
        return "; ".join(qemu[-2:])
    if any("child process died" in ln for ln in lines):
        return "the appliance's qemu died while it was starting"
    return "the appliance did not start"


def _error_line(text: str, prog: str) -> str:
    """virt-v2v's own error: the paragraph starting at the last "<prog>: error:" line (any
    "<something>: error:" line if there is none), else the last line of output."""
    lines = text.splitlines()
    for pattern in (re.compile(rf"^{re.escape(prog)}: error: "), re.compile(r"^[\w.-]+: error: ")):
        idx = [i for i, ln in enumerate(lines) if pattern.match(ln)]
        if idx:
            para = []
            for ln in lines[idx[-1]:]:
                if not ln.strip():
                    break
                para.append(ln.strip())
            return " ".join(para)
    tail = [ln.strip() for ln in lines if ln.strip()]
    return tail[-1] if tail else "no output"


def convert(paths: list[str], fmt: str = "raw", *, timeout_s: float, log_path: str | None = None,
            initramfs_modules: str | None = None) -> ConversionReport:
    """Convert the VM on ``paths`` (its disks, boot disk first; local files such as the target
    volume's raw image) in place to run on KVM/virtio: ``virt-v2v-in-place -i disk -if FMT``.

    With ``log_path`` the run is verbose (``-v -x``, several MB) and its whole output is kept
    there; without, only progress lines are produced and a temporary file is removed.
    ``XMS_V2V_COMMAND`` replaces the virt-v2v-in-place executable (same arguments), for tests.

    ``initramfs_modules="dep"``: for an initramfs-tools guest (Debian, Ubuntu), put
    ``MODULES=dep`` in a conf.d file before the conversion and remove it afterwards (whatever
    the outcome; up to 300 s more after a timeout), so the initramfs virt-v2v rebuilds holds the
    modules this machine's disks need (virt-v2v adds the virtio ones) instead of all of them.
    Costs two appliance launches (~30 s each); saves 10+ min under TCG for a Debian-default
    ``MODULES=most`` guest. Other guests are left alone (``initramfs_override`` stays None).

    Raises :class:`GuestConversionFailed` carrying virt-v2v's own "...: error: ..." line on a
    non-zero exit, or on timeout (the process group and every process it started are killed);
    :class:`EmulatorFailed` (retryable) when libguestfs could not launch its appliance, before
    anything was written.

    Measured (TCG, 2 contended cores; scripts/guest/NOTES.md), all of it the guest's
    ``update-initramfs`` run inside the appliance except ~50 s (launch ~22 s, inspection ~14 s,
    fstrim ~4 s): guest MODULES=list 108-140 s, MODULES=dep 149 s, MODULES=most 724 s (full
    Debian kernel) and 792 s (kernel modules pruned, busier machine); that MODULES=most guest
    with ``initramfs_modules="dep"``: 150 s + 50 s for the override. A busy machine adds ~50 %.
    """
    if not paths:
        raise GuestConversionFailed("no disks to convert")
    exe = os.environ.get("XMS_V2V_COMMAND") or _need(V2V)
    prog = os.path.basename(exe) if os.environ.get("XMS_V2V_COMMAND") else V2V
    cmd = [exe, *(["-v", "-x"] if log_path else []), "-i", "disk", "-if", fmt, *paths]
    deadline = time.monotonic() + timeout_s
    override, override_s, warnings = None, 0.0, set()
    if initramfs_modules:
        data, secs = _helper("initramfs.py", ["--format", fmt, "--set", initramfs_modules, *paths],
                             timeout_s=timeout_s, what="setting the initramfs MODULES override",
                             error=GuestConversionFailed)
        override_s += secs
        if data.get("applied"):
            override = initramfs_modules
    keep = log_path is not None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="xms-v2v-", suffix=".log")
        os.close(fd)
    try:
        with open(log_path, "wb") as out:
            rc, secs = _run(cmd, env=libguestfs_env(), timeout_s=max(1.0, deadline - time.monotonic()),
                            out=out)
        with open(log_path, "rb") as f:
            text = f.read().decode(errors="replace")
    finally:
        if not keep:
            try:
                os.unlink(log_path)
            except OSError:
                pass
        if override:
            try:
                _, csecs = _helper("initramfs.py", ["--format", fmt, "--clear", *paths], timeout_s=300,
                                   what="removing the initramfs MODULES override", error=GuestConversionFailed)
                override_s += csecs
            except (GuestConversionFailed, EmulatorFailed) as e:
                warnings.add(f"{e} (the guest keeps MODULES={override} in "
                             "/etc/initramfs-tools/conf.d/zz-xms-convert.conf)")
    where = f" (log: {log_path})" if keep else ""
    steps = [ConversionStep(at_s=float(m[1]), message=m[2])
             for m in (_STEP_RE.match(ln) for ln in text.splitlines()) if m]
    if rc is None:
        last = steps[-1].message if steps else "no progress reported"
        raise GuestConversionFailed(
            f"{prog} did not finish within {timeout_s:.0f} s and was killed; last step: {last}{where}")
    if rc != 0:
        launch = _launch_failure(text)
        if launch:
            raise EmulatorFailed(f"{prog} could not start the libguestfs appliance: {launch} [exit {rc}]{where}")
        raise GuestConversionFailed(f"{_error_line(text, prog)} [exit {rc}]{where}")
    guest = None
    for st in steps:
        m = re.match(r"Converting (.*) to run on KVM", st.message)
        if m:
            guest = m[1]
    warnings |= {ln.split(": warning: ", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith(f"{prog}: warning: ")}
    return ConversionReport(seconds=round(secs, 1), command=cmd, log_path=log_path if keep else None,
                            guest=guest, steps=steps, warnings=sorted(warnings),
                            initramfs_override=override, override_seconds=round(override_s, 1))


def regenerate_initramfs(paths: list[str], fmt: str = "raw", *, timeout_s: float,
                         modules: str = "dep") -> float:
    """Fallback without virt-v2v, for an initramfs-tools guest whose disks already mount by
    UUID/LABEL: add virtio_pci/virtio_blk/virtio_scsi to /etc/initramfs-tools/modules and run
    ``update-initramfs -u -k all`` in the libguestfs appliance with ``MODULES=modules`` for that
    run only. Returns seconds. Raises :class:`GuestConversionFailed` (no OS, not
    initramfs-tools, update-initramfs failed, timeout). Measured: 100 s for the Debian-default
    (MODULES=most, full kernel) guest, against 724 s for virt-v2v-in-place on it; it does none
    of virt-v2v's other work (no fstab/grub device remapping, no guest agent, no Windows).
    """
    data, secs = _helper("initramfs.py", ["--format", fmt, "--rebuild", modules, *paths],
                         timeout_s=timeout_s, what="regenerating the initramfs",
                         error=GuestConversionFailed)
    return round(secs, 1)


# --------------------------------------------------------------------------- boot

OVMF_CANDIDATES = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
]


_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _tail(path: str, n: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 16384))
            text = _ANSI_RE.sub("", f.read().decode(errors="replace"))
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    except OSError:
        return "(no serial output)"
    return " | ".join(lines[-n:]) or "(no serial output)"


def boot(paths: list[str], *, firmware: str = "bios", marker: str = "XMS-BOOT-OK", timeout_s: float,
         serial_log: str, fmt: str = "raw", memory_mb: int = 512, snapshot: bool = False,
         shutdown_grace_s: float = 15) -> float:
    """Boot the VM on ``paths`` (virtio-blk disks, boot order = list order) under qemu and wait
    for a serial-console line containing ``marker``; return the seconds from qemu's start to it.

    ``qemu-system-x86_64 -accel tcg -m 512 -nographic -nodefaults -serial file:SERIAL_LOG
    -no-reboot`` plus one ``virtio-blk-pci`` per disk with ``bootindex``; ``firmware="uefi"``
    adds OVMF pflash (Debian package ``ovmf``) with a private copy of its variable store.
    ``snapshot=True`` discards the guest's writes. The serial log is polled (every 0.2 s),
    nothing sleeps for a fixed time. After the marker the guest gets ``shutdown_grace_s`` to
    power itself off, then qemu is killed; qemu is always gone when this returns or raises.

    Raises :class:`GuestBootFailed` with the last serial lines if qemu exits first or the marker
    does not appear within ``timeout_s``. Measured: the converted test guest prints its marker
    23-36 s after qemu starts (TCG; the firstboot scripts virt-v2v adds run before it, ~1 s).
    """
    if not paths:
        raise GuestBootFailed("no disks to boot")
    qemu = _need(QEMU)
    acc = accel()
    cmd = [qemu, "-accel", acc, *(["-cpu", "host"] if acc == "kvm" else []), "-m", str(memory_mb),
           "-nographic", "-nodefaults", "-serial", f"file:{serial_log}", "-no-reboot"]
    if snapshot:
        cmd.append("-snapshot")
    tmpdir = None
    if firmware == "uefi":
        found = next(((c, v) for c, v in OVMF_CANDIDATES if os.path.exists(c) and os.path.exists(v)), None)
        if not found:
            raise GuestBootFailed("UEFI boot needs OVMF firmware: apt-get install ovmf")
        tmpdir = tempfile.mkdtemp(prefix="xms-boot-")
        vars_copy = os.path.join(tmpdir, "OVMF_VARS.fd")
        shutil.copyfile(found[1], vars_copy)
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={found[0]}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    elif firmware != "bios":
        raise GuestBootFailed(f"unknown firmware {firmware!r} (bios or uefi)")
    for i, p in enumerate(paths):
        if "," in p:
            raise GuestBootFailed(f"disk path {p!r} contains a comma, which qemu -drive cannot take")
        cmd += ["-drive", f"file={p},format={fmt},if=none,id=disk{i}",
                "-device", f"virtio-blk-pci,drive=disk{i},bootindex={i}"]

    Path(serial_log).parent.mkdir(parents=True, exist_ok=True)
    open(serial_log, "wb").close()  # qemu appends to an existing file; start empty
    token = uuid.uuid4().hex
    errf = tempfile.TemporaryFile()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
                            env={**os.environ, RUN_TOKEN_VAR: token}, start_new_session=True)
    needle = marker.encode()
    try:
        pos, partial = 0, b""
        while True:
            with open(serial_log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            data = partial + chunk
            lines = data.split(b"\n")
            partial = lines.pop()  # an incomplete last line is checked again with more bytes
            if any(needle in ln for ln in lines) or needle in partial:
                took = time.monotonic() - t0
                try:
                    proc.wait(timeout=shutdown_grace_s)
                except subprocess.TimeoutExpired:
                    pass
                return took
            if proc.poll() is not None:
                errf.seek(0)
                err = " ".join(errf.read().decode(errors="replace").split())[-500:]
                if proc.returncode < 0:  # a signal: qemu crashed or was killed, the guest is not at fault
                    raise EmulatorFailed(
                        f"qemu died of signal {_signal_name(-proc.returncode)} after "
                        f"{time.monotonic() - t0:.0f} s of the boot check{'; qemu: ' + err if err else ''}; "
                        f"last serial lines: {_tail(serial_log)}")
                raise GuestBootFailed(
                    f"qemu exited (status {proc.returncode}) after {time.monotonic() - t0:.0f} s "
                    f"without printing {marker!r}{'; qemu: ' + err if err else ''}; last serial lines: "
                    f"{_tail(serial_log)}")
            if time.monotonic() - t0 > timeout_s:
                raise GuestBootFailed(
                    f"no {marker!r} on the serial console within {timeout_s:.0f} s; last serial lines: "
                    f"{_tail(serial_log)}")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            _kill_run(proc, token)
        errf.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
