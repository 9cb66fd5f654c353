"""The command line: QEMU-compatible options, so scripts written for QEMU work unchanged."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import trio

from blocklayer.lockbytes import lock_byte

from . import QEMU_VERSION, __version__, machinemodel
from .errors import QMPError
from .server import DEFAULT_POLL_MAX_NS

PROG = "qmp-server"
DEFAULT_SOCKET = "qmp.sock"

# Options that take an argument, and flags that don't; accepted with one or two dashes.
_WITH_ARG = {"qmp", "name", "incoming", "pidfile", "machine", "M", "blockdev", "device", "drive", "display",
             "poll-max-ns"}
_FLAGS = {"S", "nodefaults", "nographic", "daemonize", "version", "help", "h"}

HELP = f"""\
usage: {PROG} [options]

A QMP monitor server that behaves like QEMU's for the VM run state, block devices
and migration. With no -qmp option it listens on ./{DEFAULT_SOCKET}.

  -qmp unix:PATH,server=on,wait=off   serve QMP on a UNIX socket (repeatable)
  -qmp tcp:HOST:PORT,server=on,wait=off  serve QMP on a TCP socket (no authentication:
                        keep it on loopback; other addresses get a warning)
  -S                    start paused (prelaunch); 'cont' starts the VM
  -name NAME            VM name (query-name)
  -incoming defer|unix:PATH|tcp:HOST:PORT  wait for an incoming migration
  -blockdev OPTIONS     add a block node (key=value,... or JSON), as blockdev-add
  -daemonize            detach once the monitor sockets are ready (then cwd is /)
  -pidfile PATH         write the process id to PATH, locked: a second server refuses it
  -poll-max-ns NS       (qmp-server only) after answering a client, poll its socket
                        up to NS ns for the next request (default {DEFAULT_POLL_MAX_NS}; 0: off)
  -machine none, -nodefaults, -display none, -nographic   accepted for compatibility
  -version, --version   print the version and exit
  -h, -help, --help     print this help and exit
"""


class UsageError(Exception):
    """A command-line error: printed as ``qmp-server: <message>``, exit status 1."""


@dataclass
class MonitorSpec:
    """One ``-qmp`` argument."""

    text: str
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0


@dataclass
class Options:
    """Parsed command line."""

    monitors: list[MonitorSpec] = field(default_factory=list)
    start_paused: bool = False
    name: str | None = None
    incoming: str | None = None
    blockdevs: list[str] = field(default_factory=list)
    #: ``-device`` and ``-drive`` arguments as typed (keyval, or JSON for -device), in order.
    devices: list[str] = field(default_factory=list)
    #: ``-machine TYPE`` (a name or alias from machinemodel.MACHINE_TYPES).
    machine_type: str = "none"
    drives: list[str] = field(default_factory=list)
    daemonize: bool = False
    pidfile: str | None = None
    default_socket: bool = False
    poll_max_ns: int = DEFAULT_POLL_MAX_NS


def _split_commas(text: str) -> list[str]:
    # QEMU's option syntax: ',' separates, ',,' is a literal comma.
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def _bool_opt(value: str | None, key: str, text: str) -> bool:
    if value is None or value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise UsageError(f"-qmp {text}: Parameter '{key}' expects 'on' or 'off'")


def parse_monitor(text: str) -> MonitorSpec:
    """Parse ``unix:PATH,server=on,wait=off`` / ``tcp:HOST:PORT,...`` (and ``server,nowait``)."""
    parts = _split_commas(text)
    address, settings = parts[0], parts[1:]
    server = False
    wait = True
    for item in settings:
        key, _, value = item.partition("=")
        if key == "server":
            server = _bool_opt(value if "=" in item else None, key, text)
        elif key == "nowait":
            wait = False
        elif key == "wait":
            wait = _bool_opt(value if "=" in item else None, key, text)
        elif key in ("pretty", "id"):
            continue
        else:
            raise UsageError(f"-qmp {text}: Invalid parameter '{key}'")
    if address.startswith("unix:"):
        spec = MonitorSpec(text, "unix", path=address[len("unix:"):])
        if not spec.path:
            raise UsageError(f"-qmp {text}: missing socket path")
    elif address.startswith("tcp:"):
        host, _, port = address[len("tcp:"):].rpartition(":")
        if not port.isdigit():
            raise UsageError(f"-qmp {text}: invalid port '{port}'")
        spec = MonitorSpec(text, "tcp", host=host or "127.0.0.1", port=int(port))
    else:
        raise UsageError(f"-qmp {text}: '{address}' is not a valid char driver")
    if not server:
        raise UsageError(f"-qmp {text}: only listening sockets are supported: add server=on,wait=off")
    if wait:
        raise UsageError(f"-qmp {text}: wait=on is not supported: add wait=off")
    return spec


def parse_args(argv: list[str]) -> Options:
    """Parse QEMU-style options; raise UsageError like QEMU would fail."""
    options = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            raise UsageError(f"{arg}: invalid option")
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if name in _FLAGS:
            if name in ("help", "h"):
                sys.stdout.write(HELP)
                raise SystemExit(0)
            if name == "version":
                major, minor, micro = QEMU_VERSION
                print(f"{PROG} {__version__} (QMP semantics of QEMU {major}.{minor}.{micro})")
                raise SystemExit(0)
            if name == "S":
                options.start_paused = True
            elif name == "daemonize":
                options.daemonize = True
            i += 1
            continue
        if name not in _WITH_ARG:
            raise UsageError(f"{arg}: invalid option")
        if i + 1 >= len(argv):
            raise UsageError(f"{arg}: requires an argument")
        value = argv[i + 1]
        i += 2
        if name == "qmp":
            options.monitors.append(parse_monitor(value))
        elif name == "name":
            # QEMU: the first element is the implied 'guest' key.
            first = _split_commas(value)[0]
            options.name = first.partition("=")[2] if first.startswith("guest=") else first
        elif name == "incoming":
            options.incoming = value
        elif name == "pidfile":
            options.pidfile = value
        elif name in ("machine", "M"):
            machine_type = _split_commas(value)[0].removeprefix("type=")
            if machinemodel.machine_type(machine_type) is None:
                raise UsageError(f"{arg} {value}: unsupported machine type '{machine_type}'")
            options.machine_type = machine_type
        elif name == "blockdev":
            options.blockdevs.append(value)
        elif name == "device":
            options.devices.append(value)
        elif name == "drive":
            options.drives.append(value)
        elif name == "poll-max-ns":
            # isdigit() alone admits "²" and other digits int() refuses.
            if not (value.isascii() and value.isdigit()) or int(value) > 1_000_000_000:
                raise UsageError(f"{arg} {value}: expected nanoseconds from 0 to 1000000000")
            options.poll_max_ns = int(value)
        # -display: accepted and ignored (there is no display).
    if not options.monitors:
        options.monitors.append(MonitorSpec(DEFAULT_SOCKET, "unix", path=DEFAULT_SOCKET))
        options.default_socket = True
    return options


class PidFileError(Exception):
    """The pidfile could not be created, locked or written (QEMU's texts)."""


class PidFile:
    """A ``-pidfile`` created and held as QEMU's ``qemu_write_pidfile`` does.

    The file is created mode 0600 and locked for as long as the process lives, so a second
    server (or QEMU, whose lockf() lock conflicts with ours) given the same path refuses
    to start. It is removed at exit only while it is still ours: another process may have
    replaced it since (same path, another inode).
    """

    def __init__(self, path: str, fd: int) -> None:
        # Absolute, as QEMU keeps its realpath: -daemonize changes to / before the exit.
        self.path = os.path.realpath(path)
        self.fd = fd

    @classmethod
    def create(cls, path: str) -> PidFile:
        """Create, lock and fill ``path``; raise :class:`PidFileError` with QEMU's text."""
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise PidFileError(f"Could not create '{path}': {os.strerror(exc.errno or 0)}") from exc
            try:
                if cls._lock_and_write(path, fd):
                    return cls(path, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    @staticmethod
    def _lock_and_write(path: str, fd: int) -> bool:
        """False when ``path`` no longer names the file we locked (its owner removed it)."""
        try:
            # An OFD lock, unlike lockf(), survives this process closing some other
            # descriptor of the same file; the kernel still makes it conflict with QEMU's.
            lock_byte(fd, 0, exclusive=True)
        except OSError as exc:
            raise PidFileError(f"Cannot lock pid file: {os.strerror(exc.errno or 0)}") from exc
        opened = os.fstat(fd)
        try:
            named = os.stat(path)
        except OSError:
            return False
        if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            return False
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            raise PidFileError(f"Failed to truncate pid file: {os.strerror(exc.errno or 0)}") from exc
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            raise PidFileError(f"Failed to write pid file: {os.strerror(exc.errno or 0)}") from exc
        return True

    def remove(self) -> None:
        """Delete the file if the path still names the one we hold locked, then let go."""
        if self.fd < 0:
            return
        try:
            named = os.stat(self.path)
            held = os.fstat(self.fd)
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(self.path)
        except OSError:
            pass  # already gone, or not ours to touch
        os.close(self.fd)
        self.fd = -1


def _is_loopback(host: str) -> bool:
    """Whether ``host`` resolves to loopback addresses only."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False  # the bind will fail and say why
    return all(ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in infos)


def exposure_warnings(options: Options) -> list[str]:
    """Warnings for ``-qmp tcp:`` monitors reachable from other hosts.

    QEMU accepts any address; so do we, but whoever can connect can read and write every
    file this process can (blockdev-add, then HMP ``qemu-io``), so say so at start.
    """
    return [
        f"warning: -qmp {monitor.text}: '{monitor.host}' is not a loopback address: anyone who "
        "can connect can read and write any file this process can (no authentication)"
        for monitor in options.monitors
        if monitor.kind == "tcp" and not _is_loopback(monitor.host)
    ]


def fail(message: str) -> NoReturn:
    """Print ``qmp-server: message`` to stderr and exit with status 1."""
    print(f"{PROG}: {message}", file=sys.stderr)
    raise SystemExit(1)


def _daemonize() -> int:
    """Fork; the parent waits until the child is ready. Returns the pipe to report on."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        if report == b"ok":
            os._exit(0)
        sys.stderr.write(report.decode(errors="replace"))
        os._exit(1)
    os.close(read_end)
    os.setsid()
    # As QEMU's os_daemonize(): fork again so the daemon is no session leader (it can never
    # acquire a terminal), and create files no wider than 0750.
    if os.fork():
        os._exit(0)
    os.umask(0o027)
    return write_end


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``qmp-server`` and ``python -m qmp_server``."""
    from .app import App, SetupError

    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        fail(str(err))
    for warning in exposure_warnings(options):
        print(f"{PROG}: {warning}", file=sys.stderr)
    report_fd = _daemonize() if options.daemonize else None
    pidfile: PidFile | None = None
    try:
        # Before any socket exists (qemu_init writes the pidfile before creating chardevs):
        # a server that must not run leaves nothing behind.
        if options.pidfile:
            try:
                pidfile = PidFile.create(options.pidfile)
            except PidFileError as err:
                raise PidFileError(f"cannot create PID file: {err}") from None
        app = App(options)
        app.setup()
    except (SetupError, QMPError, PidFileError) as err:
        if pidfile is not None:
            pidfile.remove()
        message = f"{PROG}: {err}\n"
        if report_fd is not None:
            os.write(report_fd, message.encode())
            os._exit(1)
        sys.stderr.write(message)
        raise SystemExit(1) from None
    if options.default_socket:
        path = os.path.abspath(options.monitors[0].path)
        print(f"{PROG}: QMP monitor listening on {path}\n"
              f"connect with: qmp-shell {path}   (pip install qemu.qmp)", flush=True)
    if report_fd is not None:
        # QEMU's os_setup_post(): leave the start directory (paths given relative to it
        # were resolved above), and detach from the terminal.
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.write(report_fd, b"ok")
        os.close(report_fd)
    try:
        code = trio.run(app.serve)
    finally:
        app.cleanup()
        if pidfile is not None:
            pidfile.remove()
    raise SystemExit(code)
