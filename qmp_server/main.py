"""The ``qmp-server`` program: parse the command line, set up, detach, serve, clean up.

On top of everything else: :mod:`qmp_server.cli` reads the options, :mod:`qmp_server.app`
wires and serves the machine; this module runs them in QEMU's order (pidfile, then
monitors, then detach) and reports start-up errors as QEMU does
(``<program>: <option as typed>: <message>``).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import trio

from .app import App, SetupError
from .chardev import ChardevError
from .cli import Options, PidFile, PidFileError, UsageError, parse_args
from .errorreport import error_report, message_prefix, program_name, report_log_records
from .errors import QMPError


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
        f"warning: {device.option}: '{device.host}' is not a loopback address: anyone who "
        "can connect can read and write any file this process can (no authentication)"
        for device in options.chardevs.devices.values()
        if device.host is not None and device.server and not _is_loopback(device.host)
    ]


def fail(message: str) -> NoReturn:
    """Print ``<program>: message`` to stderr (as error_report) and exit with status 1."""
    error_report(message)
    raise SystemExit(1)


#: The signals QEMU's termination handler takes (os_setup_signal_handling): each asks
#: for a shutdown, reported as "terminating on signal N from pid P (NAME)".
_TERMINATION_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _sender_name(pid: int) -> str:
    """QEMU's qemu_get_pid_name: /proc/PID/cmdline, printed with %s (up to the first NUL,
    so argv[0] as the sender was started)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "<unknown process>"


def termination_message(signo: int, pid: int) -> str:
    """QEMU's qemu_kill_report text for a termination signal sent by ``pid`` (0: the
    kernel, e.g. ^C at the terminal)."""
    if pid == 0:
        return f"terminating on signal {signo}"
    return f"terminating on signal {signo} from pid {pid} ({_sender_name(pid)})"


def _wait_for_termination_signals() -> None:
    """The reporter thread: take each termination signal with its sender, report the
    first one as QEMU does, then hand the signal on to its handler."""
    reported = False
    while True:
        info = signal.sigwaitinfo(_TERMINATION_SIGNALS)
        if not reported:
            reported = True
            error_report(termination_message(info.si_signo, info.si_pid))
        # Raised again in this thread, with the signal unblocked here only: the C-level
        # handler runs here, the Python one (Trio's, which requests the shutdown) in the
        # main thread as for any signal; without one, the default action ends the process.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {info.si_signo})
        signal.raise_signal(info.si_signo)
        signal.pthread_sigmask(signal.SIG_BLOCK, {info.si_signo})


def report_termination_signals() -> None:
    """Print QEMU's ``terminating on signal N from pid P (NAME)`` for a termination signal.

    Python's handlers are not given the sender (no siginfo), so the signals are blocked
    in this thread, and in every thread started later (they inherit the mask), and a
    dedicated thread takes them with sigwaitinfo, which does give it. Call it before any
    other thread is started (a thread with the signals unblocked could take one, which
    would then go unreported) and after the last fork (-daemonize: a fork keeps only the
    forking thread). The price: processes started later inherit the blocked mask too
    (``exec:`` migration commands), unless whoever starts them unblocks it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATION_SIGNALS)
    threading.Thread(target=_wait_for_termination_signals, name="termination-signals", daemon=True).start()


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


def main(argv: list[str] | None = None, *, on_serving: Callable[[], None] | None = None,
         report_signals: bool = False) -> None:
    """Run the server (``qmp-server`` and ``python -m qmp_server`` go through
    :mod:`qmp_server.launcher`); ends with ``SystemExit`` carrying the exit status.

    ``on_serving`` is called once set-up is over, just before serving starts.
    ``report_signals``: report termination signals with their sender, as QEMU does
    (:func:`report_termination_signals`; it changes the process's signal mask, so only
    for a process of its own).
    """
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        fail(str(err))
    report_log_records()
    for warning in exposure_warnings(options):
        print(f"{message_prefix()}{warning}", file=sys.stderr)
    report_fd = _daemonize() if options.daemonize else None
    if report_signals and options.qtest is None:
        # QEMU is silent about the signal under a qtest driver (qemu_kill_report).
        report_termination_signals()
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
    except (SetupError, QMPError, PidFileError, ChardevError) as err:
        if pidfile is not None:
            pidfile.remove()
        message = f"{message_prefix()}{err}\n"
        if report_fd is not None:
            os.write(report_fd, message.encode())
            os._exit(1)
        sys.stderr.write(message)
        raise SystemExit(1) from None
    if options.default_socket:
        path = os.path.abspath(options.chardevs.monitors[0].chardev.path or "")
        print(f"{program_name()}: QMP monitor listening on {path}\n"
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
    if on_serving is not None:
        on_serving()
    try:
        code = trio.run(app.serve)
    finally:
        app.cleanup()
        if pidfile is not None:
            pidfile.remove()
    raise SystemExit(code)
