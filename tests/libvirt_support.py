"""A private libvirtd for the tests: session mode, every directory under one scratch folder.

Session mode (libvirtd run by an unprivileged user) needs no system configuration, no
``libvirt-qemu`` user, no systemd, and touches nothing outside its folder, so the tests can
run next to a system libvirtd or none. Run as root, the daemon is started in a user
namespace (``unshare --user``) that maps an unprivileged id onto root: libvirtd then sees a
non-zero uid and runs in session mode, while the emulators it starts can still read what
root can (the installed console script may live under a 0700 home). In that namespace
/dev/kvm is covered by an unreadable file: libvirt re-probes an emulator without KVM each
time it looks it up while KVM is usable ("KVM is now usable, invalidating capabilities"),
and QEMU is then probed for TCG alone, as our server. See docs/libvirt.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: The uid/gid the daemon gets inside the user namespace when the tests run as root.
_NAMESPACE_ID = 1000

QEMU_CONF = """\
# Emulator output goes straight to the domain's log file: no virtlogd daemon to start.
stdio_handler = "file"
security_driver = "none"
"""

LIBVIRTD_CONF = """\
log_filters = "1:qemu.qemu_monitor 3:*"
log_outputs = "1:file:{log}"
"""


def libvirt_installed() -> bool:
    """Whether libvirtd and virsh (with the QEMU driver) are installed."""
    daemon = shutil.which("libvirtd") or Path("/usr/sbin/libvirtd").exists()
    return bool(daemon) and bool(shutil.which("virsh"))


def libvirtd_path() -> str:
    """libvirtd's path (it lives in sbin, often not on a user's PATH)."""
    return shutil.which("libvirtd") or "/usr/sbin/libvirtd"


def _namespaced(command: list[str], no_kvm: Path) -> list[str]:
    """``command`` as an unprivileged id mapped onto root, /dev/kvm hidden behind ``no_kvm``.

    Two user namespaces: the outer one (root mapped to root) may bind-mount in its own
    mount namespace; the inner one runs the command as uid 1000, which owns the mode-000
    file and, without capabilities, cannot open it.
    """
    inner = (f'mount --bind "$1" /dev/kvm 2>/dev/null; shift; exec unshare --user '
             f'--map-user={_NAMESPACE_ID} --map-group={_NAMESPACE_ID} "$@"')
    return ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
            "sh", "-c", inner, "sh", str(no_kvm), *command]


def user_namespaces_work() -> bool:
    """Whether the namespaces :func:`_namespaced` needs can be made here (needed as root)."""
    try:
        result = subprocess.run(_namespaced(["id", "-u"], Path("/dev/null")),
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == str(_NAMESPACE_ID)


def installed_entry_point() -> Path | None:
    """The ``qmp-server`` console script of the Python running the tests.

    The one next to the interpreter: a shim on PATH (pyenv's) would be a wrapper script.
    """
    candidate = Path(sys.executable).parent / "qmp-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("qmp-server")
    return Path(found) if found else None


class Libvirtd:
    """A session-mode libvirtd under ``root``, driven with virsh."""

    def __init__(self, root: Path, emulator_dir: Path) -> None:
        self.root = root
        self.log = root / "libvirtd.log"
        for name in ("home", "config/libvirt", "cache", "run", "data"):
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "run").chmod(0o700)
        (root / "config/libvirt/qemu.conf").write_text(QEMU_CONF)
        (root / "config/libvirt/libvirtd.conf").write_text(LIBVIRTD_CONF.format(log=self.log))
        self.socket = root / "run/libvirt/libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        # emulator_dir first on libvirtd's PATH: `virsh capabilities` lists the
        # qemu-system-x86_64 found there.
        self.env = {**os.environ,
                    "HOME": str(root / "home"), "XDG_CONFIG_HOME": str(root / "config"),
                    "XDG_CACHE_HOME": str(root / "cache"), "XDG_RUNTIME_DIR": str(root / "run"),
                    "XDG_DATA_HOME": str(root / "data"),
                    "PATH": f"{emulator_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the daemon and wait for its socket."""
        command = [libvirtd_path()]
        if os.geteuid() == 0:
            no_kvm = self.root / "no-kvm"
            no_kvm.touch(mode=0o000)
            command = _namespaced(command, no_kvm)
        self.socket.unlink(missing_ok=True)
        self.process = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.socket.exists() and self.virsh("uri", check=False).returncode == 0:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.process.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"libvirtd did not start: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the daemon (domains keep running, as with a real libvirtd restart)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start the daemon; it reconnects to the running domains' monitors."""
        self.stop()
        self.start()

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS``; with ``check`` a failure raises with virsh's error."""
        result = subprocess.run(["virsh", "-c", self.uri, *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.strip()}\n{self.log_tail()}")
        return result

    def destroy_all(self) -> None:
        """Destroy every running domain (the end of a test run)."""
        listed = self.virsh("list", "--name", check=False).stdout.split()
        for name in listed:
            self.virsh("destroy", name, check=False)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the daemon's log (errors and the monitor traffic)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def domain_log(self, name: str) -> str:
        """The domain's log: the emulator's command line and its standard error."""
        path = self.root / "cache/libvirt/qemu/log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def domain_xml(name: str, emulator: str, disk: object, *, bus: str = "virtio") -> str:
    """A minimal domain with one qcow2 disk: ``vda`` on virtio-blk, or ``sda`` on a
    virtio-scsi controller (``bus='scsi'``)."""
    controller = "    <controller type='scsi' index='0' model='virtio-scsi'/>\n" if bus == "scsi" else ""
    target = "sda" if bus == "scsi" else "vda"
    return f"""\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
{controller}    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='{target}' bus='{bus}'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def require_libvirt() -> None:
    """Skip without libvirt, except in CI (QMP_SERVER_REQUIRE_QEMU=1: .ci/run installs it)."""
    problem = None
    if not libvirt_installed():
        problem = "libvirtd/virsh are not installed"
    elif os.geteuid() == 0 and not user_namespaces_work():
        problem = "as root, the session-mode libvirtd needs user namespaces (unshare --user)"
    elif shutil.which("qemu-img") is None:
        problem = "qemu-img is needed to create the disk images"
    if problem is not None:
        if os.environ.get("QMP_SERVER_REQUIRE_QEMU") == "1":
            pytest.fail(f"{problem} but QMP_SERVER_REQUIRE_QEMU=1")
        pytest.skip(problem)


def normalize_virsh(text: str, replacements: dict[str, str]) -> str:
    """What virsh printed with scratch paths and names replaced, blanks squeezed, empty
    lines dropped."""
    for old, new in replacements.items():
        text = text.replace(old, new)
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.strip().splitlines())
    return "\n".join(line for line in lines if line)
