"""The program's launcher (qmp_server/launcher.py, issue 9 §5) keeps what a user sees.

It ends the process with ``os._exit`` after the orderly shutdown, so it must flush
what Python still buffers (stdout into a pipe is block-buffered unless
``PYTHONUNBUFFERED`` is set, as it is in some CI environments: these tests clear it), and
it turns the garbage collector off during start-up, which must not leak into programs
that import ``qmp_server`` as a library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qmp_server import __version__

SERVER = [sys.executable, "-m", "qmp_server"]


def _buffered_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}


def test_output_printed_before_exit_reaches_a_pipe(tmp_path: Path) -> None:
    for option, expected in (("-version", __version__), ("-help", "-pidfile PATH")):
        result = subprocess.run([*SERVER, option], capture_output=True, text=True, timeout=60,
                                cwd=tmp_path, env=_buffered_env())
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout


def test_serve_and_quit_on_stdio_with_a_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    requests = b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n{"execute":"quit"}\n'
    result = subprocess.run([*SERVER, "-machine", "none", "-qmp", "stdio", "-pidfile", str(pidfile)],
                            input=requests, capture_output=True, timeout=60, cwd=tmp_path,
                            env=_buffered_env())
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert "QMP" in replies[0] and replies[1] == {"return": {}}
    assert replies[2] == {"return": {"status": "running", "running": True}}
    # quit's reply and the SHUTDOWN event, the last bytes written before the exit
    assert sorted(str(reply.get("event", reply.get("return"))) for reply in replies[3:]) == ["SHUTDOWN", "{}"]
    assert not pidfile.exists()


def test_failed_start_exits_1_with_the_message(tmp_path: Path) -> None:
    # -blockdev fails in set-up, after the pidfile was written: both go
    blockdev = f"driver=file,filename={tmp_path / 'missing.img'},node-name=disk"
    result = subprocess.run([*SERVER, "-machine", "none", "-pidfile", str(tmp_path / "pid"),
                             "-qmp", f"unix:{tmp_path / 's'},server=on,wait=off", "-blockdev", blockdev],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_buffered_env())
    assert result.returncode == 1
    assert result.stderr.startswith(f"qmp-server: -blockdev {blockdev}: Could not open"), result.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "pid").exists()


def test_importing_the_package_leaves_the_garbage_collector_alone() -> None:
    code = "import gc, qmp_server.main, qmp_server.app; print(gc.isenabled(), gc.get_freeze_count())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "0"], result.stderr
