"""The Trio socket server: listeners, one task group per connection, orderly exit.

It only moves bytes: what a client sent goes to its
:class:`~qmp_server.protocol.session.QMPSession`, the requests the session yields go to
the dispatcher, and what the session produces (greeting, replies, events) goes back to
the client, under the server's own rules for many clients (fairness, backpressure,
output bounds). Every protocol decision is the session's.
"""

from __future__ import annotations

import array
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Collection
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .dispatcher import Dispatcher
from .errors import QMPError
from .fdsets import MonitorFds, fdsets_of, set_current
from .protocol.requests import Request
from .protocol.session import INBAND_QUEUE_MAX, QMPSession
from .unixsocket import raise_fd_limit

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

# How long to poll a client's socket for its next request (QEMU's IOThread default).
DEFAULT_POLL_MAX_NS = 32768
# Output bytes queued for one client (replies and events it has not read yet) above which
# the server stops reading that client's input until the client has read some of it.
# QEMU suspends a monitor once 8 requests are queued (handle_qmp_command());
# we serve many clients, so the bound is on bytes, which are what costs memory.
OUTPUT_LIMIT = 1 << 20
# Once below OUTPUT_LIMIT / OUTPUT_RESUME_DIVISOR, input is read again.
OUTPUT_RESUME_DIVISOR = 2
# Events still arrive while a client is over its bound (they come from other clients
# and from the VM, not from its own input). Up to this many bytes of them are queued;
# one more and the client, which has stopped reading, is disconnected.
EVENT_SLACK = 256 << 10
# Input goes to the parser this much at a time, so that input that makes many (error)
# replies per byte produces them in steps the output bound can stop between.
INPUT_SLICE = 4096
# The longest a busy client runs before it lets other tasks run (seconds).
QUANTUM = 0.0005
# Coalesce at most this much queued output into one write.
WRITE_CHUNK = 64 << 10
# Room for the descriptors one read may carry (QEMU's socket chardev takes 16: TCP_MAX_FDS).
MAX_FDS = 16
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4)
# How long to wait before accepting again after running out of descriptors.
ACCEPT_RETRY = 0.1
# Accept failures this long after the previous one start a new spell, logged again.
ACCEPT_QUIET = 10.0


#: How long output still queued when a client's input ends may take to go out (seconds).
OUTPUT_DRAIN_AT_EOF = 5.0
#: How long the clients' queued output may take to go out when the server exits.
OUTPUT_DRAIN_AT_EXIT = 1.0


class Connection:
    """One client: a reader, an in-band worker, a writer, around the client's session.

    The reader feeds input to the session and runs the requests the session says run at
    once (out-of-band ones, and every one while OOB is off); the others go through a
    queue of :data:`~qmp_server.protocol.session.INBAND_QUEUE_MAX` to the worker, so that
    OOB ones can overtake them. The session's output is written at once by whoever made
    it when nothing is queued ahead of it; otherwise the writer task sends it, in order.

    Output not yet taken by the client is bounded (:data:`OUTPUT_LIMIT`): above it the
    reader stops reading and parsing input until the client has read some; events that
    still arrive are queued up to :data:`EVENT_SLACK` more, past which the client is
    disconnected. A client with input waiting runs at most :data:`QUANTUM` before it
    lets the others run.
    """

    def __init__(self, machine: Machine, dispatcher: Dispatcher, stream: trio.abc.Stream,
                 poll_max_ns: int = DEFAULT_POLL_MAX_NS, fds: MonitorFds | None = None,
                 *, shares_stdio: bool = False, pretty: bool = False) -> None:
        """``shares_stdio``: the client is the process's stdin/stdout, whose output other
        parts of the server (error_report's stderr lines, HMP qemu-io) interleave with.
        ``pretty``: the monitor has ``pretty=on`` (QEMU's pretty-printed JSON)."""
        self.machine = machine
        # QEMU writes a monitor's reply before it runs the next command, so on a shared
        # terminal or pipe a command's stderr lines (qcow2_signal_corruption's, say)
        # always follow the replies before it; here the writer task may lag behind.
        self._write_before_running = shares_stdio
        #: Descriptors this client sent (SCM_RIGHTS) and the monitor's named ones.
        self.fds = fds if fds is not None else MonitorFds()
        self.dispatcher = dispatcher
        self.stream = stream
        self.session = QMPSession(dispatcher.plain_queries(), pretty=pretty)
        # Output is bytes to write, or an action to run once everything before it is written.
        self._out_send, self._out_recv = trio.open_memory_channel[bytes | Callable[[], None]](math.inf)
        self._in_send, self._in_recv = trio.open_memory_channel[Request](INBAND_QUEUE_MAX)
        # For direct writes: the socket's descriptor (non-blocking under Trio), and whether
        # the writer is waiting with nothing queued, so that a direct write keeps the order.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        # A UNIX socket may carry descriptors: it is read with recvmsg, through a socket
        # object sharing the descriptor (detached, never closed, when the client goes).
        self._unix: socket.socket | None = None
        if self._fd >= 0 and stream.socket.family == socket.AF_UNIX:  # type: ignore[attr-defined]
            self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=self._fd)
        self._writer_idle = False
        self._broken = False
        # Actions taken from the queue but not run yet (run even if the client is gone).
        self._actions: list[Callable[[], None]] = []
        self._poll_window = poll_max_ns / 1e9 if self._fd >= 0 else 0.0
        self._poll_misses = 0  # polls in a row that found nothing (capped)
        self._poll_skip = 0  # requests to wait for without polling, after misses
        # Backpressure: bytes queued or being written, events queued while over the
        # bound, and the event the reader waits on for the queue to drain.
        self._queued = 0
        self._overflow = 0
        self._room = trio.Event()
        self._dropped = False  # disconnected for not reading its output
        # Fairness: when this task last resumed after letting others run.
        self._resumed = time.perf_counter()

    def _enqueue(self, data: bytes) -> None:
        self._writer_idle = False
        self._queued += len(data)
        self._out_send.send_nowait(data)

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
                self._room.set()
                return
            if written == len(data):
                return
            data = data[written:]
        self._enqueue(data)

    def _after_output(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything produced before it was written."""
        if self._writer_idle or self._broken:
            action()
            return
        self._writer_idle = False
        self._out_send.send_nowait(action)

    def _deliver_event(self, message: dict[str, Any]) -> None:
        if self._broken or not self.session.event(message):
            return
        data = self.session.data_to_send()
        if self._queued > OUTPUT_LIMIT:
            self._overflow += len(data)
            if self._overflow > EVENT_SLACK:
                self._drop()
                return
        self._output(data)

    def _drop(self) -> None:
        """Disconnect a client that stopped reading: its events would pile up forever.

        Dropping them instead would leave it a stream that looks complete but is not.
        """
        log.warning("a QMP client stopped reading its replies and events; disconnecting it")
        self._dropped = True
        self._broken = True
        self._room.set()
        if isinstance(self.stream, trio.SocketStream):
            # Wakes the reader (end of input) and the writer (a failed send) at once.
            with contextlib.suppress(OSError):
                self.stream.socket.shutdown(socket.SHUT_RDWR)

    async def _pace(self) -> bool:
        """Let other clients run, or wait for the client to read its output, as due.

        Returns False once the connection is being dropped.
        """
        if self._queued > OUTPUT_LIMIT and not self._broken:
            while self._queued > OUTPUT_LIMIT // OUTPUT_RESUME_DIVISOR and not self._broken:
                self._room = trio.Event()
                await self._room.wait()
            self._resumed = time.perf_counter()
        elif time.perf_counter() - self._resumed >= QUANTUM:
            await trio.lowlevel.checkpoint()
            self._resumed = time.perf_counter()
        return not self._dropped

    async def drained(self) -> None:
        """Return once everything queued for the client went out (or it went away)."""
        while not (self._broken or self._writer_idle):
            await trio.sleep(0.001)

    async def run(self) -> None:
        """Serve the connection until the client goes away."""
        self._enqueue(self.session.data_to_send())  # the greeting
        self.machine.events.subscribe(self._deliver_event)
        # The commands this connection's tasks run find its descriptors (monitor_cur()).
        set_current(self.fds)
        fdsets = fdsets_of(self.machine)
        fdsets.client_opened()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._inband_worker)
                await self._reader()
                # The end of the input need not be the end of the output (stdio, a
                # half-closed socket): let what is queued go out first, within a bound.
                with trio.move_on_after(OUTPUT_DRAIN_AT_EOF):
                    await self.drained()
                nursery.cancel_scope.cancel()
        finally:
            self.machine.events.unsubscribe(self._deliver_event)
            # What the client sent and nobody claimed is closed, as QEMU's chardev does;
            # fd sets nobody can use any more go too (QEMU's monitor_fdsets_cleanup).
            self.fds.close_received()
            fdsets.client_closed(self.machine.vm.running)
            if self._unix is not None:
                self._unix.detach()
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
            self._queued = 0
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
                yielded = False
                while True:
                    try:
                        data = (os.read(self._fd, 65536) if self._unix is None
                                else self._recvmsg())
                    except BlockingIOError:
                        if clock() >= deadline:
                            break
                        await trio.lowlevel.checkpoint()
                        yielded = True
                        continue
                    self._poll_misses = 0
                    if yielded:
                        self._resumed = clock()
                    return data
                self._poll_misses = min(self._poll_misses + 1, 6)
                self._poll_skip = (1 << self._poll_misses) - 1
        if self._unix is not None:
            # As trio's own receive: try first, wait only when nothing is there yet.
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                try:
                    received: bytes | bytearray = self._recvmsg()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._fd)
                    waited = True
                    continue
                break
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            received = await self.stream.receive_some(65536)
        self._resumed = time.perf_counter()
        return received

    def _recvmsg(self) -> bytes:
        """Read what the client sent, keeping the descriptors that came with it."""
        assert self._unix is not None
        data, ancillary, _, _ = self._unix.recvmsg(65536, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                                                   | socket.MSG_DONTWAIT)
        if ancillary:
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds.extend(array.array("i", payload[:usable]))
            for fd in fds:
                os.set_blocking(fd, True)  # O_NONBLOCK travels with a descriptor: QEMU resets it
            self.fds.receive(fds)
        return data

    async def _reader(self) -> None:
        while True:
            # A client with input always waiting must not keep the others (the accept
            # loop, signals) from running; nor may one that does not read its output
            # make us queue replies without end.
            if (self._queued > OUTPUT_LIMIT or self._dropped
                    or time.perf_counter() - self._resumed >= QUANTUM):
                if not await self._pace():
                    return
            try:
                data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            if not await self._handle_input(data):
                return

    async def _handle_input(self, data: bytes | bytearray) -> bool:
        """Parse and run what ``data`` holds; False once the connection is being dropped."""
        session = self.session
        for start in range(0, len(data), INPUT_SLICE):
            if start and not await self._pace():
                return False
            try:
                requests = session.receive(data if len(data) <= INPUT_SLICE and type(data) is bytes
                                           else bytes(data[start:start + INPUT_SLICE]))
            except Exception:
                # A bug in the input path: this connection's state is unknown, so drop it,
                # but never let it take the server (and every other session) down.
                log.exception("internal error reading QMP input; closing the connection")
                return False
            if not requests:
                # A plain query the session answered itself (or a message not complete yet).
                out = session.data_to_send()
                if out:
                    self._output(out)
                continue
            # Taken off the list as they run: a request that was answered (an error's
            # traceback included) is garbage at once, not when the whole slice is done.
            requests.reverse()
            first = True
            while requests:
                if not first and not await self._pace():
                    return False
                first = False
                request = requests.pop()
                if session.runs_at_once(request):
                    await self._execute(request)
                else:
                    await self._in_send.send(request)
        return True

    async def _inband_worker(self) -> None:
        async for request in self._in_recv:
            await self._execute(request)

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
        session = self.session
        if self._write_before_running:
            with trio.move_on_after(1.0):  # a stalled reader must not hang the monitor
                await self.drained()
        if not session.begin(request):
            # Answered by the session (a request QEMU's checks refused, or negotiation).
            self._output(session.data_to_send())
            return
        try:
            result, error, context = await self.dispatcher.dispatch(session, request)
            session.reply(request, result, error)
        except Exception as err:
            # A bug in a command (or an unencodable reply) fails that command only.
            log.exception("internal error executing %r", request.command)
            session.reply(request, error=QMPError(f"Internal error: {type(err).__name__}"))
            self._output(session.data_to_send())
            return
        self._output(session.data_to_send())
        for action in context.after_reply:
            self._after_output(action)

    def _sent(self, size: int) -> None:
        """``size`` queued bytes left the queue (written, or dropped with the client)."""
        self._queued -= size
        if self._queued <= OUTPUT_LIMIT:
            self._overflow = 0
        if self._queued <= OUTPUT_LIMIT // OUTPUT_RESUME_DIVISOR:
            self._room.set()

    async def _writer(self) -> None:
        pending: list[bytes] = []
        while True:
            try:
                item = self._out_recv.receive_nowait()
            except trio.WouldBlock:
                self._writer_idle = not self._broken
                item = await self._out_recv.receive()
            # Coalesce what is already queued into one write, stopping at an action and
            # at WRITE_CHUNK bytes (the join copies them).
            size = 0
            while True:
                if isinstance(item, bytes):
                    pending.append(item)
                    size += len(item)
                    if size >= WRITE_CHUNK:
                        break
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
                del data
            pending.clear()
            self._sent(size)
            actions, self._actions = self._actions, []
            for action in actions:
                action()


async def _accept_loop(listener: trio.SocketListener, nursery: trio.Nursery,
                       handle: Callable[[trio.SocketStream], Any]) -> None:
    """Accept clients on ``listener`` for ever, each served in a task of ``nursery``.

    Out of descriptors (or kernel memory), accept() fails until something is closed;
    the clients wait in the backlog meanwhile, and we retry every ACCEPT_RETRY seconds.
    Such a spell is logged once, not on every retry as trio.serve_listeners does: a
    failure is logged only after ACCEPT_QUIET seconds without one.
    """
    last_failure = -math.inf
    while True:
        try:
            stream = await listener.accept()
        except trio.ClosedResourceError:
            return
        except OSError as err:
            now = trio.current_time()
            if now - last_failure >= ACCEPT_QUIET:
                log.error("accepting a QMP client failed: %s; retrying (not logged again "
                          "while it keeps failing)", os.strerror(err.errno or 0))
            last_failure = now
            await trio.sleep(ACCEPT_RETRY)
            continue
        nursery.start_soon(handle, stream)


async def serve(machine: Machine, dispatcher: Dispatcher, listeners: list[trio.SocketListener],
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED, *,
                poll_max_ns: int = DEFAULT_POLL_MAX_NS,
                pretty: Collection[trio.SocketListener] = ()) -> None:
    """Serve every listener until the machine asks to exit.

    ``poll_max_ns``: how long to poll a client's socket for its next request after
    answering it (0: never poll). ``pretty``: the listeners of ``pretty=on`` monitors.
    """

    connections: set[Connection] = set()

    async def handle(stream: trio.SocketStream, named: dict[str, int], pretty: bool) -> None:
        connection = Connection(machine, dispatcher, stream, poll_max_ns, MonitorFds(named),
                                pretty=pretty)
        connections.add(connection)
        try:
            await connection.run()
        finally:
            connections.discard(connection)

    raise_fd_limit()
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            # Each monitor's named descriptors (getfd) outlive its clients, as in QEMU.
            named: dict[str, int] = {}
            nursery.start_soon(_accept_loop, listener, nursery,
                               partial(handle, named=named, pretty=any(listener is p for p in pretty)))
        task_status.started()
        await machine.vm.exit_requested.wait()
        # qemu_cleanup: running block jobs are cancelled (their events go out too).
        await machine.jobs.cancel_all_at_exit()
        # What was said before the exit (quit's SHUTDOWN, a failed incoming migration's
        # MIGRATION event) reaches the clients first, within a bound: QEMU flushes its
        # monitors' output on the way out (monitor_cleanup).
        with trio.move_on_after(OUTPUT_DRAIN_AT_EXIT):
            for connection in list(connections):
                await connection.drained()
        nursery.cancel_scope.cancel()
