"""Replaying a recorded QMP scenario against any QEMU-compatible program.

The scenarios under ``tests/data/scenarios/`` were recorded against QEMU 7.2; what it
answered is stored beside them under ``tests/data/qemu-7.2/`` (one JSON record per line).
:func:`run` replays a scenario against our server or a live QEMU and returns records of
the same form, so that a test can compare them with the recording and with each other.

A scenario is ``{"files": {name: qemu-img create args}, "instances": {name: [args]},
"steps": [...]}``; strings may use ``{dir}`` (a scratch folder) and ``{sock:NAME}`` (a
socket path in it). A step is ``{"to": NAME, "send": OBJECT or raw text, "replies": N}``,
``{"sleep": seconds}``, ``{"wait_event": [NAME, EVENT]}`` or ``{"shell": COMMAND,
"label": TEXT}``. Timestamps are masked and the scratch folder reads ``{dir}``.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"


def scenario(name: str) -> dict[str, Any]:
    """The stored scenario ``name`` (``protocol``, ``blockdev``, ``migration``)."""
    loaded: dict[str, Any] = json.loads((DATA / "scenarios" / f"{name}.json").read_text())
    return loaded


def recorded(name: str, qemu: str = "qemu-7.2") -> list[dict[str, Any]]:
    """What ``qemu`` answered to scenario ``name``, as :func:`run` returns it."""
    lines = (DATA / qemu / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _mask(message: dict[str, Any]) -> dict[str, Any]:
    if "timestamp" in message:
        message = {**message, "timestamp": "T"}
    return message


class _Monitor:
    """One QMP connection of a replay: line-framed messages, events kept apart."""

    def __init__(self, path: str, timeout: float = 10.0, *, greets_twice: bool = False) -> None:
        """``greets_twice``: the peer is QEMU 7.2, which may send its greeting a second time
        to a client that connected while it was starting (server_support.Client.reply)."""
        self.greets_twice = greets_twice
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.lines = self.sock.makefile("rb")
        self.greeting: dict[str, Any] = json.loads(self.lines.readline())

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def next_reply(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Events received before the next reply, and the reply (None at end of input)."""
        events: list[dict[str, Any]] = []
        while True:
            line = self.lines.readline()
            if not line:
                return events, None
            message: dict[str, Any] = json.loads(line)
            if "QMP" in message and self.greets_twice:
                continue
            if "event" not in message:
                return events, message
            events.append(_mask(message))

    def events_until(self, name: str) -> list[dict[str, Any]]:
        """Every message up to and including event ``name``."""
        seen: list[dict[str, Any]] = []
        while True:
            message: dict[str, Any] = json.loads(self.lines.readline())
            seen.append(_mask(message))
            if message.get("event") == name:
                return seen

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def _substitute(value: Any, folder: str) -> Any:
    if isinstance(value, str):
        text = value.replace("{dir}", folder)
        while "{sock:" in text:
            start = text.index("{sock:")
            end = text.index("}", start)
            text = text[:start] + os.path.join(folder, text[start + 6:end] + ".sock") + text[end + 1:]
        return text
    if isinstance(value, list):
        return [_substitute(item, folder) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, folder) for key, item in value.items()}
    return value


def run(scenario: dict[str, Any], emulator: list[str]) -> list[dict[str, Any]]:
    """Replay ``scenario`` against ``emulator`` (argv before ``-qmp``); the transcript."""
    folder = tempfile.mkdtemp(prefix="qmpt")
    for args in scenario.get("files", {}).values():
        subprocess.run(["qemu-img", "create", "-q", *shlex.split(_substitute(args, folder))], check=True)
    processes: list[subprocess.Popen[bytes]] = []
    monitors: dict[str, _Monitor] = {}
    records: list[dict[str, Any]] = []
    try:
        for name, args in scenario["instances"].items():
            path = os.path.join(folder, f"{name}.sock")
            argv = [*emulator, "-qmp", f"unix:{path},server=on,wait=off", *_substitute(args, folder)]
            processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            monitors[name] = monitor = _Monitor(path, greets_twice="qemu-system" in emulator[0])
            qmp = monitor.greeting.get("QMP", {})
            records.append({"to": name, "greeting": sorted(qmp), "capabilities": qmp.get("capabilities")})
        for step in scenario["steps"]:
            if "sleep" in step:
                time.sleep(step["sleep"])
            elif "wait_event" in step:
                name, event = step["wait_event"]
                records.append({"to": name, "waited": event, "events": monitors[name].events_until(event)})
            elif "shell" in step:
                done = subprocess.run(_substitute(step["shell"], folder), shell=True,
                                      capture_output=True, text=True)
                records.append({"shell": step.get("label", "shell"), "rc": done.returncode,
                                "out": (done.stdout + done.stderr).replace(folder, "{dir}").strip()})
            else:
                records.append(_exchange(monitors[step["to"]], step, folder))
    finally:
        for monitor in monitors.values():
            monitor.close()
        for process in processes:
            process.kill()
            process.wait()
    # The scratch folder may appear anywhere in a reply (file names): mask it everywhere.
    masked: list[dict[str, Any]] = json.loads(json.dumps(records).replace(folder, "{dir}"))
    return masked


def _exchange(monitor: _Monitor, step: dict[str, Any], folder: str) -> dict[str, Any]:
    send = _substitute(step["send"], folder)
    monitor.send((send if isinstance(send, str) else json.dumps(send)) + "\n")
    record: dict[str, Any] = {"to": step["to"], "send": step["send"]}
    replies: list[dict[str, Any] | None] = []
    events: list[dict[str, Any]] = []
    for _ in range(step.get("replies", 1)):
        seen, reply = monitor.next_reply()
        events += seen
        replies.append(reply)
    record["reply"] = replies[0] if len(replies) == 1 else replies
    if events:
        record["events"] = events
    return record
