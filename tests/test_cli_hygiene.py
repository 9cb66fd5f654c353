"""Process hygiene (issue 8 §4): -pidfile locked and removed only while ours, -daemonize
leaving the start directory, a warning for TCP monitors reachable from other hosts.

Where QEMU 7.2 answers too, the same command line is run against it in the same test."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import qemu_tools
from server_support import QEMU, SERVER, Client

QEMU_PROG = "qemu-system-x86_64"
PROG = "qmp-server"
# Some tests start the server in another directory: it must still import from this tree.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}


def _argv(qemu: bool) -> list[str]:
    if qemu:
        qemu_tools.require(QEMU_PROG)
        return list(QEMU)
    return list(SERVER)


def _qmp(path: Path) -> list[str]:
    return ["-qmp", f"unix:{path},server=on,wait=off"]


@contextmanager
def _started(argv: list[str], sock: Path, cwd: Path | None = None,
             umask: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], Client]]:
    """Run ``argv`` (which serves on ``sock``) and yield it with a negotiated client."""
    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd,
                            preexec_fn=set_umask, env=ENV)
    client: Client | None = None
    try:
        client = Client(sock)
        assert client.execute("qmp_capabilities") == {"return": {}}
        yield proc, client
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _quit(proc: subprocess.Popen[bytes], client: Client) -> None:
    client.execute("quit")
    assert proc.wait(timeout=20) == 0


def _refused(argv: list[str], cwd: Path | None = None) -> tuple[int, str]:
    done = subprocess.run(argv, capture_output=True, timeout=30, cwd=cwd, check=False, env=ENV)
    return done.returncode, done.stderr.decode()


# --------------------------------------------------------------------------- -pidfile


@pytest.mark.parametrize("second_is_qemu", [False, True], ids=["ours", "qemu"])
def test_second_process_with_the_same_pidfile_refuses(tmp_path: Path, second_is_qemu: bool) -> None:
    pidfile = tmp_path / "vm.pid"
    with _started(SERVER + _qmp(tmp_path / "a.sock") + ["-pidfile", str(pidfile)],
                  tmp_path / "a.sock") as (proc, client):
        assert pidfile.read_text() == f"{proc.pid}\n"
        prog = QEMU_PROG if second_is_qemu else PROG
        code, err = _refused(_argv(second_is_qemu) + _qmp(tmp_path / "b.sock") + ["-pidfile", str(pidfile)])
        assert (code, err) == (1, f"{prog}: cannot create PID file: Cannot lock pid file: "
                                  "Resource temporarily unavailable\n")
        assert not (tmp_path / "b.sock").exists()
        assert pidfile.read_text() == f"{proc.pid}\n"
        _quit(proc, client)
    assert not pidfile.exists()


def test_our_server_refuses_a_pidfile_qemu_holds(tmp_path: Path) -> None:
    pidfile = tmp_path / "vm.pid"
    with _started(_argv(True) + _qmp(tmp_path / "q.sock") + ["-pidfile", str(pidfile)], tmp_path / "q.sock"):
        code, err = _refused(SERVER + _qmp(tmp_path / "b.sock") + ["-pidfile", str(pidfile)])
        assert (code, err) == (1, f"{PROG}: cannot create PID file: Cannot lock pid file: "
                                  "Resource temporarily unavailable\n")
        assert not (tmp_path / "b.sock").exists()


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_pidfile_is_0600_whatever_the_umask(tmp_path: Path, qemu: bool) -> None:
    pidfile = tmp_path / "vm.pid"
    with _started(_argv(qemu) + _qmp(tmp_path / "a.sock") + ["-pidfile", str(pidfile)],
                  tmp_path / "a.sock", umask=0):
        assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600


@pytest.mark.parametrize("where", ["directory", "missing-parent"])
def test_unusable_pidfile_path_one_line_error_no_socket(tmp_path: Path, where: str) -> None:
    pidfile = tmp_path if where == "directory" else tmp_path / "nodir" / "vm.pid"
    results = {}
    for qemu in (False, True):
        sock = tmp_path / f"{qemu}.sock"
        code, err = _refused([*_argv(qemu), "-pidfile", str(pidfile), *_qmp(sock)])
        assert not sock.exists()
        results[qemu] = (code, err.removeprefix(QEMU_PROG if qemu else PROG))
    reason = "Is a directory" if where == "directory" else "No such file or directory"
    assert results[False] == (1, f": cannot create PID file: Could not create '{pidfile}': {reason}\n")
    assert results[False] == results[True]


def test_pidfile_of_a_later_server_survives_our_exit(tmp_path: Path) -> None:
    # A's pidfile is removed (by an admin, a cleanup script) and B takes the name: when A
    # exits it must not delete B's pidfile, and B must still remove it on its own exit.
    pidfile = tmp_path / "vm.pid"
    with _started(SERVER + _qmp(tmp_path / "a.sock") + ["-pidfile", str(pidfile)],
                  tmp_path / "a.sock") as (proc_a, client_a):
        pidfile.unlink()
        with _started(SERVER + _qmp(tmp_path / "b.sock") + ["-pidfile", str(pidfile)],
                      tmp_path / "b.sock") as (proc_b, client_b):
            _quit(proc_a, client_a)
            assert pidfile.read_text() == f"{proc_b.pid}\n"
            _quit(proc_b, client_b)
            assert not pidfile.exists()


def test_failed_start_removes_its_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "vm.pid"
    code, err = _refused(SERVER + _qmp(tmp_path / "a.sock") + [
        "-pidfile", str(pidfile), "-blockdev", "driver=file,node-name=x,filename=/nonexistent"])
    assert code == 1 and "Could not open '/nonexistent'" in err
    assert not pidfile.exists()


# --------------------------------------------------------------------------- -daemonize


def _wait_gone(path: Path) -> None:
    deadline = time.monotonic() + 20
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_daemonize_changes_to_root_after_using_relative_paths(tmp_path: Path, qemu: bool) -> None:
    code, err = _refused([*_argv(qemu), "-daemonize", "-pidfile", "rel.pid",
                          "-qmp", "unix:rel.sock,server=on,wait=off"], cwd=tmp_path)
    assert (code, err) == (0, "")
    # Relative names were resolved in the start directory, before the daemon left it.
    pid = int((tmp_path / "rel.pid").read_text())
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        client = Client(tmp_path / "rel.sock")
        client.execute("qmp_capabilities")
        client.execute("quit")
        client.close()
    except BaseException:
        os.kill(pid, 9)
        raise
    # The pidfile is removed although the daemon's directory is now /.
    _wait_gone(tmp_path / "rel.pid")
    assert not (tmp_path / "rel.pid").exists()


def test_daemonize_reports_a_pidfile_error_through_the_parent(tmp_path: Path) -> None:
    code, err = _refused([*SERVER, "-daemonize", "-pidfile", "nodir/rel.pid",
                          "-qmp", "unix:rel.sock,server=on,wait=off"], cwd=tmp_path)
    assert (code, err) == (1, f"{PROG}: cannot create PID file: Could not create 'nodir/rel.pid': "
                              "No such file or directory\n")
    assert not (tmp_path / "rel.sock").exists()


# --------------------------------------------------------------------------- -qmp tcp:


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)])
def test_tcp_monitor_off_loopback_warns(host: str, warned: bool) -> None:
    port = _free_port()
    text = f"tcp:{host}:{port},server=on,wait=off"
    proc = subprocess.Popen([*SERVER, "-qmp", text], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV)
    try:
        client = Client(("127.0.0.1", port))
        client.execute("qmp_capabilities")
        client.execute("quit")
        client.close()
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    warning = (f"{PROG}: warning: -qmp {text}: '{host}' is not a loopback address: anyone who can "
               "connect can read and write any file this process can (no authentication)\n")
    assert err.decode() == (warning if warned else "")
