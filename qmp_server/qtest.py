"""The qtest protocol (``-qtest``), as far as a machine without a guest can answer it.

QEMU's test harnesses (``QEMUQtestMachine``) open a qtest channel beside the monitor and
wait for the emulator to connect to it. Its commands read and write guest memory and
I/O ports, step the virtual clock, and so on (QEMU's qtest_process_command). Answered
here as QEMU 7.2 answers them: ``endianness`` (x86: little), and with ``-accel qtest``
``clock_step [NS]`` and ``clock_set NS``, which move the virtual clock (the one internal
snapshots record) and reply with its value. There is no guest memory or I/O space: those
commands get ``FAIL`` with a reason, so a harness that needs a guest fails loudly instead
of hanging.

As QEMU does without ``-qtest-log``, the channel's traffic is logged on stderr
(:class:`QtestLog`): ``[I T] OPENED`` when it connects, ``[R +T] COMMAND`` and
``[S +T] REPLY`` for each exchange, ``[I +T] CLOSED`` when the harness hangs up (T: the
seconds since it connected). QEMU's iotests read that log (and filter those lines out).
"""

from __future__ import annotations

import re
import sys
import time
from typing import Protocol, TextIO

import trio


class Clock(Protocol):
    """The virtual clock qtest moves (QEMU_CLOCK_VIRTUAL)."""

    def now_ns(self) -> int: ...

    def set_ns(self, value: int) -> None: ...


def _integer(word: str) -> int | None:
    """qemu_strtoi64 with base 0: decimal, 0x hex or 0 octal, optional sign."""
    try:
        return int(word, 0) if not re.fullmatch(r"[+-]?0[0-7]+", word) else int(word, 8)
    except ValueError:
        return None


def answer(line: bytes, clock: Clock | None = None, qtest_accel: bool = False) -> bytes:
    """The reply to one qtest command line (qtest_process_command)."""
    words = line.decode("utf-8", errors="replace").split()
    if not words:
        return b""
    command = words[0]
    if command == "endianness":
        return b"OK little\n"
    if qtest_accel and clock is not None and command in ("clock_step", "clock_set"):
        now = clock.now_ns()
        if command == "clock_step":
            # No argument: up to the next virtual-clock timer; there are none here, so
            # the clock stays (qemu_clock_deadline_ns_all is -1).
            step = _integer(words[1]) if len(words) > 1 else -1
            target = None if step is None else now + step
        else:
            target = _integer(words[1]) if len(words) > 1 else None
        if target is None:
            # QEMU asserts here and dies; a harness gets a reason instead.
            return f"FAIL {command} needs a number of nanoseconds\n".encode()
        # qtest_clock_warp only ever moves the clock forward.
        if target > now:
            clock.set_ns(target)
        return f"OK {clock.now_ns()}\n".encode()
    return f"FAIL Unknown command '{command}'\n".encode()


class QtestLog:
    """QEMU's qtest log (qtest_log_fp, stderr by default): what went over the channel,
    timed from its opening (qtest_event, qtest_process_command, qtest_send_prefix)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self._opened_at: float | None = None

    def _write(self, text: str) -> None:
        out = self._out if self._out is not None else sys.stderr
        out.write(text)
        out.flush()

    def _elapsed(self) -> float:
        return 0.0 if self._opened_at is None else time.monotonic() - self._opened_at

    def opened(self) -> None:
        """CHR_EVENT_OPENED: the timer starts."""
        self._opened_at = time.monotonic()
        self._write("[I 0.000000] OPENED\n")  # g_timer_elapsed of a timer just made

    def received(self, line: bytes) -> None:
        """A command line, its words as QEMU splits them (on single spaces)."""
        words = line.decode("utf-8", errors="replace").split(" ")
        self._write(f"[R +{self._elapsed():.6f}]" + "".join(f" {word}" for word in words) + "\n")

    def sent(self, reply: bytes) -> None:
        """A reply, as written to the channel."""
        if self._opened_at is not None:
            self._write(f"[S +{self._elapsed():.6f}] " + reply.decode("utf-8", errors="replace"))

    def closed(self) -> None:
        """CHR_EVENT_CLOSED: the harness hung up."""
        if self._opened_at is not None:
            self._write(f"[I +{self._elapsed():.6f}] CLOSED\n")
            self._opened_at = None


async def serve_qtest(stream: trio.abc.Stream, clock: Clock | None = None,
                      qtest_accel: bool = False, log: QtestLog | None = None) -> None:
    """Answer qtest command lines from ``stream`` until it ends (``log``: the channel's
    log, already told it opened)."""
    pending = b""
    async with stream:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    if log is not None:
                        log.closed()
                    return
                pending += data
                replies = b""
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    reply = answer(line, clock, qtest_accel)
                    if log is not None and reply:
                        log.received(line)
                        log.sent(reply)
                    replies += reply
                if replies:
                    await stream.send_all(replies)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if log is not None:
                log.closed()
            return
