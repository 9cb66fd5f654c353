"""The Trio socket server: listeners, one task group per connection, orderly exit."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .dispatcher import Dispatcher
from .errors import QMPError
from .fastpath import FastPath
from .session import Mode, QMPSession, Request
from .wire import encode

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

# QEMU's per-monitor in-band queue length (QMP_REQ_QUEUE_LEN_MAX).
INBAND_QUEUE = 8
# How long to poll a client's socket for its next request (QEMU's IOThread default).
DEFAULT_POLL_MAX_NS = 32768


class ListenError(Exception):
    """A monitor socket could not be set up; the message is for the user."""


def _remove_stale_socket(path: str) -> None:
    """Make room for our socket without ever deleting something that is not ours to delete."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left behind by a process that died
        return
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise ListenError(f"{path}: {os.strerror(err.errno or 0)}") from err
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by a running server")


def bind_unix(path: str) -> trio.SocketListener:
    """A listening UNIX socket at ``path``, mode 0600, replacing only a stale socket."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # bind creates the file 0600 itself: no window where it is open
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise ListenError(f"Failed to bind socket to {path}: {os.strerror(err.errno or 0)}") from err
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class Connection:
    """One client: a reader, an in-band worker, a writer.

    The reader runs out-of-band requests itself, and in-band ones too until OOB is
    enabled (QEMU then reads no further input while a command runs either); after that
    in-band requests go through a queue of 8 to the worker, so that OOB ones can overtake
    them. Output is written at once by whoever produced it when nothing is queued ahead
    of it; otherwise the writer task sends it, in order.
    """

    def __init__(self, machine: Machine, dispatcher: Dispatcher, stream: trio.abc.Stream,
                 poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        self.machine = machine
        self.dispatcher = dispatcher
        self.stream = stream
        self.session = QMPSession()
        # Output is bytes to write, or an action to run once everything before it is written.
        self._out_send, self._out_recv = trio.open_memory_channel[bytes | Callable[[], None]](math.inf)
        self._in_send, self._in_recv = trio.open_memory_channel[Request](INBAND_QUEUE)
        # For direct writes: the socket's descriptor (non-blocking under Trio), and whether
        # the writer is waiting with nothing queued, so that a direct write keeps the order.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._writer_idle = False
        self._broken = False
        # Actions taken from the queue but not run yet (run even if the client is gone).
        self._actions: list[Callable[[], None]] = []
        self._fast = FastPath(machine, dispatcher.queries)
        # In-band requests queued for the worker or running there (OOB enabled only).
        self._inband_pending = 0
        self._poll_window = poll_max_ns / 1e9 if self._fd >= 0 else 0.0
        self._poll_misses = 0  # polls in a row that found nothing (capped)
        self._poll_skip = 0  # requests to wait for without polling, after misses

    def _output(self, data: bytes) -> None:
        """Send ``data`` to the client after everything produced before it."""
        if self._broken:
            return
        if self._writer_idle and self._fd >= 0:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                self._broken = True  # the reader sees the connection end and closes the session
                return
            if written == len(data):
                return
            data = data[written:]
        self._writer_idle = False
        self._out_send.send_nowait(data)

    def _after_output(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything produced before it was written."""
        if self._writer_idle or self._broken:
            action()
            return
        self._writer_idle = False
        self._out_send.send_nowait(action)

    def _deliver_event(self, message: dict[str, Any]) -> None:
        # QEMU sends no events to a monitor still in negotiation mode.
        if self.session.mode is Mode.COMMAND:
            self._output(encode(message))

    async def run(self) -> None:
        """Serve the connection until the client goes away."""
        self._out_send.send_nowait(encode(self.session.greeting()))
        self.machine.events.subscribe(self._deliver_event)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._inband_worker)
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self.machine.events.unsubscribe(self._deliver_event)
            # Replies may be lost with the client, but what a command asked to happen after
            # its reply (``quit``: exit) still happens.
            self._writer_idle = False
            self._broken = True
            while True:
                try:
                    item = self._out_recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if not isinstance(item, bytes):
                    self._actions.append(item)
            actions, self._actions = self._actions, []
            for action in actions:
                action()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(self.stream)

    async def _receive(self) -> bytes | bytearray:
        """The client's next input (empty at its end).

        A client that was just answered often sends its next request within
        microseconds. Polling the socket for a short while then, as QEMU's IOThreads do
        (``poll-max-ns``), saves the wake-up of an event loop gone to sleep, which on a VM
        costs tens of microseconds per request. Other tasks run between polls. A client
        that keeps us waiting longer than the window is polled for less and less often
        (after 1, 3, 7, ... 63 unpolled requests), so a slow or idle client costs at most
        one window now and then.
        """
        if self._poll_window:
            if self._poll_skip:
                self._poll_skip -= 1
            else:
                clock = time.perf_counter
                deadline = clock() + self._poll_window
                while True:
                    try:
                        data = os.read(self._fd, 65536)
                    except BlockingIOError:
                        if clock() >= deadline:
                            break
                        await trio.lowlevel.checkpoint()
                        continue
                    self._poll_misses = 0
                    return data
                self._poll_misses = min(self._poll_misses + 1, 6)
                self._poll_skip = (1 << self._poll_misses) - 1
        return await self.stream.receive_some(65536)

    async def _reader(self) -> None:
        while True:
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            if (self._inband_pending == 0 and self.session.mode is Mode.COMMAND
                    and self.session.between_messages()):
                # Nothing is ahead of this input, so answering it now is answering it in
                # order; the fast path takes only what the general path would run at once.
                try:
                    reply = self._fast.answer(data)
                except Exception:
                    # A failing query: the general path runs it again and reports the
                    # failure as it does for any command.
                    reply = None
                if reply is not None:
                    self._output(reply)
                    continue
            try:
                requests = self.session.receive(bytes(data))
            except Exception:
                # A bug in the input path: this connection's state is unknown, so drop it,
                # but never let it take the server (and every other session) down.
                log.exception("internal error reading QMP input; closing the connection")
                return
            for request in requests:
                if request.oob or not self.session.oob_enabled:
                    # QEMU dispatches an out-of-band request at once, in its I/O thread,
                    # before it parses further input: its reply precedes the reply to
                    # anything sent after it, and it overtakes the queued in-band ones.
                    # Without OOB, QEMU suspends input while an in-band command runs, so
                    # running it here, before reading more, is the same as queueing it.
                    await self._execute(request)
                else:
                    self._inband_pending += 1
                    await self._in_send.send(request)

    async def _inband_worker(self) -> None:
        async for request in self._in_recv:
            try:
                await self._execute(request)
            finally:
                self._inband_pending -= 1

    async def _execute(self, request: Request) -> None:
        # A client that vanishes mid-command must not leave a half-done change behind: the
        # command always runs to completion; only its reply may be lost. Commands run by
        # the reader (no OOB) cannot be cancelled by a disconnect, since the reader itself
        # notices it only afterwards; those run by the worker (or OOB ones) can, so they
        # are shielded. Shielding costs a fifth of a query-status round trip, hence not
        # always.
        if self.session.oob_enabled:
            with trio.CancelScope(shield=True):
                await self._run_command(request)
        else:
            await self._run_command(request)

    async def _run_command(self, request: Request) -> None:
        try:
            reply, context = await self.dispatcher.dispatch(self.session, request)
            data = encode(reply)
        except Exception as err:
            # A bug in a command (or an unencodable reply) fails that command only.
            log.exception("internal error executing %r", request.command)
            error = QMPError(f"Internal error: {type(err).__name__}")
            self._output(encode(request.response(error=error)))
            return
        self._output(data)
        for action in context.after_reply:
            self._after_output(action)

    async def _writer(self) -> None:
        pending: list[bytes] = []
        while True:
            try:
                item = self._out_recv.receive_nowait()
            except trio.WouldBlock:
                self._writer_idle = not self._broken
                item = await self._out_recv.receive()
            # Coalesce whatever is already queued into one write, stopping at an action.
            while True:
                if isinstance(item, bytes):
                    pending.append(item)
                else:
                    self._actions.append(item)
                    break
                try:
                    item = self._out_recv.receive_nowait()
                except trio.WouldBlock:
                    break
            if pending and not self._broken:
                data = b"".join(pending)
                pending.clear()
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._broken = True
            pending.clear()
            actions, self._actions = self._actions, []
            for action in actions:
                action()


async def serve(machine: Machine, dispatcher: Dispatcher, listeners: list[trio.SocketListener],
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED, *,
                poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
    """Serve every listener until the machine asks to exit.

    ``poll_max_ns``: how long to poll a client's socket for its next request after
    answering it (0: never poll).
    """

    async def handle(stream: trio.SocketStream) -> None:
        await Connection(machine, dispatcher, stream, poll_max_ns).run()

    async with trio.open_nursery() as nursery:
        machine.nursery = nursery
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started()
        await machine.exit_requested.wait()
        nursery.cancel_scope.cancel()
