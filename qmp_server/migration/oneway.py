"""One-way migration streams: ``exec:CMD``, ``file:PATH[,offset=N]``, ``fd:`` on a pipe or file.

QEMU migrates into a command or a file as well as to a listening destination, and the
destination may load such a stream much later (QEMU's iotests migrate to
``exec:cat > FIFO`` or a file and start the destination afterwards). Nobody answers on
such a stream. The same frames travel (see :mod:`.stream`), but the source does not wait
for the destination's header, acceptance and acknowledgement: it completes once the
stream is written and its sink closed. The destination reads the stream whenever it
starts; what it would send back goes nowhere.

:class:`OneWayStream` adapts one direction to the two-way ``trio.abc.Stream`` that
:class:`.stream.Channel` speaks over, so the two halves keep one code path.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import subprocess

import trio

from .uri import ConnectError, ExecAddress, FdAddress, FileAddress, OneWayAddress, stream_socket

#: How long a command that took the outgoing stream may take to exit once its stdin is
#: closed (``cat > FILE`` writing its last bytes); then it gets QEMU's SIGTERM and
#: SIGKILL (qio_channel_command_abort).
EXEC_EXIT_WAIT = 2.0
_CHUNK = 65536


class OneWayError(Exception):
    """Opening a one-way stream failed; the message is QEMU's error-desc for it."""


class _FileSink(trio.abc.SendStream):
    """Writes to a regular file in a worker thread (regular files never block in poll)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.to_thread.run_sync(_write_all, self.fd, bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        await trio.lowlevel.checkpoint()


class _FileSource(trio.abc.ReceiveStream):
    """Reads a regular file in a worker thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await trio.to_thread.run_sync(os.read, self.fd, max_bytes or _CHUNK)

    async def aclose(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        await trio.lowlevel.checkpoint()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class OneWayStream(trio.abc.Stream):
    """One direction of a migration stream, seen as a two-way stream.

    With a ``sink`` (the source's side) nothing ever arrives: receiving waits forever.
    With a ``source`` (the destination's side) sending discards the bytes.
    """

    def __init__(self, *, sink: trio.abc.SendStream | None = None,
                 source: trio.abc.ReceiveStream | None = None,
                 process: trio.Process | None = None) -> None:
        self.sink = sink
        self.source = source
        self.process = process

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write to the sink; without one, the bytes go nowhere."""
        if self.sink is None:
            await trio.lowlevel.checkpoint()
            return
        await self.sink.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """As the sink says."""
        if self.sink is not None:
            await self.sink.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Read from the source; without one, wait forever (no peer ever answers)."""
        if self.source is None:
            await trio.sleep_forever()
        assert self.source is not None
        return bytes(await self.source.receive_some(max_bytes))

    async def finish(self) -> None:
        """The source's end of the stream: close the sink so that the reader sees the
        end, and let a command write out what it has (bounded)."""
        if self.sink is not None:
            await self.sink.aclose()
        if self.process is not None:
            with trio.move_on_after(EXEC_EXIT_WAIT):
                await self.process.wait()

    async def aclose(self) -> None:
        """Close both directions; a command still running gets SIGTERM, then SIGKILL."""
        for half in (self.sink, self.source):
            if half is not None:
                await trio.aclose_forcefully(half)
        process = self.process
        if process is not None and process.returncode is None:
            with trio.CancelScope(shield=True):
                for signal_sent in (process.terminate, process.kill):
                    if process.returncode is not None:
                        break
                    signal_sent()
                    with trio.move_on_after(0.01):
                        await process.wait()


def _default_signal_mask() -> None:
    # In the child, before exec: the server blocks its termination signals in every
    # thread (main.report_termination_signals takes them with sigwaitinfo), and a child
    # inherits the mask; the command must be stoppable by SIGTERM as under QEMU.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


async def _spawn(command: str, *, outgoing: bool) -> trio.Process:
    # QEMU's exec_start_outgoing/incoming_migration: argv {"/bin/sh", "-c", command}; the
    # stream goes to its stdin (outgoing) or comes from its stdout (incoming).
    argv = ["/bin/sh", "-c", command]
    try:
        if outgoing:
            return await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE,
                                                    preexec_fn=_default_signal_mask)
        return await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                                preexec_fn=_default_signal_mask)
    except OSError as err:
        raise OneWayError(f"Failed to execute child process: {_strerror(err)}") from err


def _open_at(address: FileAddress, flags: int, truncate: bool) -> int:
    # qio_channel_file_new_path's text for any failure; the stream starts at the offset
    # (file_start_outgoing_migration also cuts off what the file held past it).
    try:
        fd = os.open(address.path, flags | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise OneWayError(f"Unable to open {address.path}: {_strerror(err)}") from err
    try:
        if truncate:
            os.ftruncate(fd, address.offset)
        os.lseek(fd, address.offset, os.SEEK_SET)
    except OSError as err:
        os.close(fd)
        raise OneWayError(f"Unable to open {address.path}: {_strerror(err)}") from err
    return fd


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno or errno.EIO)


def is_socket(fd: int) -> bool:
    """Whether ``fd`` is a socket (an ``fd:`` socket carries the two-way stream)."""
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError as err:
        raise OneWayError(f"Failed to use descriptor {fd}: {_strerror(err)}") from err


def _fd_sink(fd: int) -> trio.abc.SendStream:
    # A pipe (or FIFO, terminal) waits in the event loop, so migrate_cancel can stop a
    # write nobody reads; a regular file never blocks in poll: written in a thread.
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return _FileSink(fd)
    return trio.lowlevel.FdStream(fd)


def _fd_source(fd: int) -> trio.abc.ReceiveStream:
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return _FileSource(fd)
    return trio.lowlevel.FdStream(fd)


async def open_sink(address: OneWayAddress) -> OneWayStream:
    """The outgoing stream into a command's stdin, a file, or a pipe or file passed with
    ``getfd`` (``address.fd``, taken from the monitor already); QEMU's error texts."""
    if isinstance(address, FdAddress):
        try:
            return OneWayStream(sink=_fd_sink(address.fd))
        except OSError as err:
            raise OneWayError(f"Failed to use descriptor {address.fd}: {_strerror(err)}") from err
    if isinstance(address, ExecAddress):
        process = await _spawn(address.command, outgoing=True)
        assert process.stdin is not None
        return OneWayStream(sink=process.stdin, process=process)
    return OneWayStream(sink=_FileSink(_open_at(address, os.O_CREAT | os.O_WRONLY, True)))


async def open_source(address: OneWayAddress) -> trio.abc.Stream:
    """The incoming stream from a command's stdout, a file, or an ``fd:`` descriptor:
    a socket is the two-way stream (a source that expects our answers is connected
    there), anything else one-way (QEMU's error texts)."""
    if isinstance(address, FdAddress):
        try:
            if is_socket(address.fd):
                return stream_socket(address.fd)
            return OneWayStream(source=_fd_source(address.fd))
        except ConnectError as err:
            raise OneWayError(str(err)) from err
        except OSError as err:
            raise OneWayError(f"Failed to use descriptor {address.fd}: {_strerror(err)}") from err
    if isinstance(address, ExecAddress):
        process = await _spawn(address.command, outgoing=False)
        assert process.stdout is not None
        return OneWayStream(source=process.stdout, process=process)
    return OneWayStream(source=_FileSource(_open_at(address, os.O_RDONLY, False)))


def _readable_fd(stream: trio.abc.Stream) -> int | None:
    """The descriptor to wait on before an incoming stream starts; None for a regular
    file (always readable: QEMU's G_IO_IN watch fires at once there)."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    if isinstance(stream, OneWayStream) and isinstance(stream.source, trio.lowlevel.FdStream):
        return stream.source.fileno()
    return None


async def wait_for_data(stream: trio.abc.Stream) -> None:
    """Return once the incoming ``exec:``/``fd:`` stream has data to read.

    QEMU's exec_start_incoming_migration and fd_start_incoming_migration do not start
    loading (``setup`` -> ``active``) when the channel is created but from a G_IO_IN
    watch on it, so the destination only goes ``active`` when the source's first bytes
    arrive (iotest 234 enables the destination's events after -incoming "exec: cat
    FIFO" and sees ``active``). A pipe whose writer went away without writing (``exec:cat
    /dev/null``) reports only a hang-up, which never satisfies that watch: QEMU never
    starts the migration and stays ``inmigrate`` (checked with QEMU 7.2; iotest 060
    relies on it). We do the same, without QEMU's busy polling: wait forever.
    """
    fd = _readable_fd(stream)
    if fd is None:
        await trio.lowlevel.checkpoint()
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        await trio.lowlevel.wait_readable(fd)
        revents = 0
        for _, flags in poller.poll(0):
            revents |= flags
        if revents & select.POLLIN:
            return
        if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            await trio.sleep_forever()
