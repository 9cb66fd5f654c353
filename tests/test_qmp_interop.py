"""Real QMP clients against the server: qemu.qmp's asyncio QMPClient, and qmp-shell.

QMPClient runs on its own asyncio event loop (``asyncio.run`` in a plain synchronous
test, never inside Trio); qmp-shell runs as a subprocess fed on standard input, the way
a script would use it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from qemu.qmp import ExecuteError, QMPClient
from server_support import running


async def _session(path: str) -> dict[str, Any]:
    """Everything a management tool would do on connecting; returns what it saw."""
    seen: dict[str, Any] = {}
    qmp = QMPClient("interop-test")
    await qmp.connect(path)  # reads the greeting, negotiates (asking for OOB, as offered)
    try:
        greeting = qmp.greeting
        assert greeting is not None
        version = cast(dict[str, int], greeting.QMP.version["qemu"])
        seen["version"] = version["major"], version["minor"]
        seen["capabilities"] = list(greeting.QMP.capabilities)
        seen["status"] = await qmp.execute("query-status")
        with qmp.listener(("STOP", "RESUME")) as listener:
            seen["stop"] = await qmp.execute("stop")
            stop = await asyncio.wait_for(listener.get(), 20)
            seen["paused"] = await qmp.execute("query-status")
            seen["cont"] = await qmp.execute("cont")
            resume = await asyncio.wait_for(listener.get(), 20)
        seen["events"] = [stop["event"], resume["event"]]
        timestamp = cast(dict[str, int], stop["timestamp"])
        seen["event_keys"] = sorted(stop), sorted(timestamp)
        seen["name"] = await qmp.execute("query-name")
        try:
            await qmp.execute("no-such-command")
        except ExecuteError as err:
            seen["error"] = err.error_class, err.error.error.desc
        try:
            await qmp.execute("query-name", oob=True)
        except ExecuteError as err:
            seen["oob_error"] = err.error_class, err.error.error.desc
        seen["hmp"] = await qmp.execute("human-monitor-command", {"command-line": "info status"})
    finally:
        await qmp.disconnect()
    return seen


def test_qmp_client(tmp_path: Path) -> None:
    with running(["-name", "interop"], tmp_path, negotiate=False):
        seen = asyncio.run(_session(str(tmp_path / "vm.sock")))
    assert seen == {
        "version": (10, 1),
        "capabilities": ["oob"],
        "status": {"status": "running", "running": True},
        "stop": {},
        "paused": {"status": "paused", "running": False},
        "cont": {},
        "events": ["STOP", "RESUME"],
        "event_keys": (["event", "timestamp"], ["microseconds", "seconds"]),
        "name": {"name": "interop"},
        "error": ("CommandNotFound", "The command no-such-command has not been found"),
        "oob_error": ("GenericError", "The command query-name does not support OOB"),
        "hmp": "VM status: running\r\n",
    }


def _qmp_shell() -> str:
    path = shutil.which("qmp-shell")
    if path is None:
        pytest.fail("qmp-shell is not installed (pip install qemu.qmp, part of the test extra)")
    return path


def _shell_replies(output: str) -> list[Any]:
    """The JSON replies qmp-shell printed, one per '(QEMU) ' prompt."""
    replies = []
    for chunk in output.split("(QEMU) ")[1:]:
        chunk = chunk.strip()
        if chunk:
            replies.append(json.loads(chunk))
    return replies


def test_qmp_shell(tmp_path: Path) -> None:
    shell = _qmp_shell()
    with running(["-S", "-name", "shell"], tmp_path, negotiate=False) as (_, watcher):
        assert watcher.execute("qmp_capabilities") == {"return": {}}
        script = "query-status\nquery-name\ncont\nquery-status\nno-such-command\n"
        result = subprocess.run([shell, str(tmp_path / "vm.sock")], input=script, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "Connected to QEMU 10.1.0" in result.stdout
        assert _shell_replies(result.stdout) == [
            {"return": {"status": "prelaunch", "running": False}},
            {"return": {"name": "shell"}},
            {"return": {}},
            {"return": {"status": "running", "running": True}},
            {"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}},
        ]
        # the shell's 'cont' really started the VM: another session saw it
        assert watcher.wait_event("RESUME")["event"] == "RESUME"
        assert watcher.cmd("query-status") == {"status": "running", "running": True}


def test_qmp_shell_hmp_mode(tmp_path: Path) -> None:
    shell = _qmp_shell()
    with running(["-S"], tmp_path, negotiate=False):
        result = subprocess.run([shell, "-H", str(tmp_path / "vm.sock")], input="info status\n",
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "VM status: paused (prelaunch)" in result.stdout
