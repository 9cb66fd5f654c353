"""The NBD server and its block exports (QEMU's blockdev-nbd.c, block/export/export.c
and nbd/server.c, our own code).

One listener (``nbd-server-start``) serves any number of exports. An export is an
anonymous BlockBackend on its node asking for consistent read, plus write when
writable, and sharing everything (blk_exp_add); like QEMU's, it keeps a read-only export
from blocking inactivation and makes a writable one block it (blk_can_inactivate).
Client connections speak :mod:`.protocol`; their I/O runs through the block service (the
graph lock, a worker thread), so a slow disk never stalls the event loop. The server's
tasks are trio system tasks: they end with ``nbd-server-stop`` or with the process, and
either way the exports' backends are released and the socket file removed.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from blocklayer.backend import BlockBackend
from blocklayer.blockstatus import BLOCK_DATA, BLOCK_ZERO, block_status_above
from blocklayer.errors import BlockError
from blocklayer.node import BlockNode
from blocklayer.perm import ALL, CONSISTENT_READ, WRITE

from ..blockservice import BlockService
from ..errors import QMPError
from ..events import EventBus
from ..jobs import id_wellformed
from ..unixsocket import LISTEN_BACKLOG, ListenError, SocketFile, bind_unix_file
from . import protocol as nbd

log = logging.getLogger(__name__)

#: How much one receive reads from a client.
_RECV_SIZE = 1 << 16


@dataclass(eq=False)
class Export:
    """One block export (QEMU's BlockExport with its NBDExport)."""

    id: str
    name: str
    description: str
    node: BlockNode
    writable: bool
    backend: BlockBackend
    size: int
    #: Connections that selected this export (QEMU: the references clients hold).
    connections: set[trio.CancelScope] = field(default_factory=set)

    def info(self) -> nbd.ExportInfo:
        """What the protocol announces (nbd_export_create's flags)."""
        # Multi-conn is announced writable or not: QEMU 7.2's flags 0x58f / 0xded.
        flags = (nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_FUA | nbd.FLAG_SEND_CACHE
                 | nbd.FLAG_CAN_MULTI_CONN)
        if self.writable:
            flags |= nbd.FLAG_SEND_TRIM | nbd.FLAG_SEND_WRITE_ZEROES | nbd.FLAG_SEND_FAST_ZERO
        else:
            flags |= nbd.FLAG_READ_ONLY
        return nbd.ExportInfo(self.name, self.description, self.size, flags)


def _errno_of(err: QMPError) -> int:
    cause = err.__cause__
    return cause.errno if isinstance(cause, BlockError) and cause.errno else errno.EIO


class NbdService:
    """The machine's NBD server and block exports."""

    def __init__(self, block: BlockService, events: EventBus) -> None:
        self.block = block
        self.events = events
        #: Exports, newest first (QEMU inserts at the head of its list).
        self.exports: list[Export] = []
        self._listener: trio.SocketListener | None = None
        self._socket_file: SocketFile | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None
        self._max_connections = 0
        self._clients = 0
        self._slot_freed: trio.Event | None = None
        self._exiting = False

    @property
    def running(self) -> bool:
        """``nbd-server-start`` succeeded and no ``nbd-server-stop`` followed."""
        return self._listener is not None

    # The server ----------------------------------------------------------------------

    async def start(self, addr: dict[str, Any], max_connections: int,
                    take_fd: Callable[[str], int]) -> None:
        """nbd_server_start with a SocketAddressLegacy (``take_fd`` resolves fd names)."""
        if self.running:
            raise QMPError("NBD server already running")
        listener, socket_file = await _listen(addr, take_fd)
        self._listener, self._socket_file = listener, socket_file
        self._max_connections = max_connections
        self._stopped = trio.Event()
        trio.lowlevel.spawn_system_task(self._serve, listener, name="nbd-server")

    async def _serve(self, listener: trio.SocketListener) -> None:
        stopped = self._stopped
        assert stopped is not None
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._close_at_exit)
                    while True:  # until cancelled
                        while self._max_connections and self._clients >= self._max_connections:
                            self._slot_freed = trio.Event()
                            await self._slot_freed.wait()
                        try:
                            stream = await listener.accept()
                        except OSError:
                            await trio.sleep(0.05)  # EMFILE and the like: try again later
                            continue
                        self._clients += 1
                        nursery.start_soon(self._client, stream)
        finally:
            # nbd-server-stop, or the process ends: close every export, the socket.
            with trio.CancelScope(shield=True):
                await listener.aclose()
            if self._socket_file is not None and not self._exiting:
                # nbd-server-stop removes the socket file; at exit QEMU leaves it.
                self._socket_file.remove()
            self._listener = self._socket_file = self._scope = None
            with trio.CancelScope(shield=True):
                for export in list(self.exports):
                    await self._delete(export)
            stopped.set()

    async def _close_at_exit(self) -> None:
        # qemu_cleanup's blk_exp_close_all: at exit every export is closed, its
        # BLOCK_EXPORT_DELETED sent (after SHUTDOWN, while the monitors still listen).
        await self.block.vm.exit_requested.wait()
        self._exiting = True
        for export in list(self.exports):
            for scope in export.connections:
                scope.cancel()
            self.exports.remove(export)
            self.events.emit("BLOCK_EXPORT_DELETED", {"id": export.id})
            with trio.CancelScope(shield=True):
                await self.block.run(export.backend.remove)
        if self._scope is not None:
            self._scope.cancel()

    async def stop(self) -> None:
        """nbd-server-stop: every NBD export goes (BLOCK_EXPORT_DELETED each), then the
        listener."""
        if not self.running or self._scope is None or self._stopped is None:
            raise QMPError("NBD server not running")
        # blk_exp_close_all_type first: clients go, then the exports. It asks the newest
        # first to shut down, and the deletions it schedules run last-scheduled first
        # (QEMU's bottom halves): the oldest export is deleted, and announced, first.
        for export in reversed(self.exports):
            for scope in export.connections:
                scope.cancel()
            await self._delete(export)
        self._scope.cancel()
        await self._stopped.wait()

    async def _client(self, stream: trio.SocketStream) -> None:
        # NBD_OPT_LIST lists the oldest export first (nbd/server.c appends to its list).
        conn = nbd.Connection(self._find_info, lambda: [e.info() for e in reversed(self.exports)])
        export: Export | None = None
        try:
            with trio.CancelScope() as scope:
                try:
                    await stream.send_all(conn.data_to_send())
                    while not conn.closed:
                        event = conn.next_event()
                        if event is None:
                            out = conn.data_to_send()
                            if out:
                                await stream.send_all(out)
                            conn.receive_data(await stream.receive_some(_RECV_SIZE))
                            continue
                        if isinstance(event, nbd.Selected):
                            export = self._find(event.export.name)
                            if export is None:  # removed meanwhile
                                break
                            export.connections.add(scope)
                        elif isinstance(event, nbd.Request):
                            assert export is not None
                            await self._serve_request(conn, export, event)
                    out = conn.data_to_send()
                    if out:
                        await stream.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the client went away
                except Exception:
                    # A bug in the protocol path: this connection's state is unknown, so
                    # close it, but never let it take the server (and the monitor) down.
                    log.exception("internal error serving an NBD client; closing its connection")
        finally:
            if export is not None:
                export.connections.discard(scope)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self._clients -= 1
            if self._slot_freed is not None:
                self._slot_freed.set()

    async def _serve_request(self, conn: nbd.Connection, export: Export, request: nbd.Request) -> None:
        try:
            result = await self.block.run(_do_request, export, request)
        except QMPError as err:
            conn.reply_error(request, _errno_of(err), err.desc)
            return
        except Exception:
            # A bug in a request fails that request, as an I/O error would in QEMU.
            log.exception("internal error serving an NBD request")
            conn.reply_error(request, errno.EIO, "Input/output error")
            return
        if request.command == nbd.CMD_READ:
            assert isinstance(result, bytes)
            conn.reply_read(request, result)
        elif request.command == nbd.CMD_BLOCK_STATUS:
            assert isinstance(result, list)
            conn.reply_block_status(request, result)
        else:
            conn.reply_done(request)

    # Exports -------------------------------------------------------------------------

    def _find(self, name: str) -> Export | None:
        return next((e for e in self.exports if e.name == name), None)

    def _find_info(self, name: str) -> nbd.ExportInfo | None:
        export = self._find(name)
        return export.info() if export is not None else None

    def find_by_id(self, export_id: str) -> Export | None:
        """The export with this id (QEMU's blk_exp_find)."""
        return next((e for e in self.exports if e.id == export_id), None)

    def check_id(self, export_id: str) -> None:
        """blk_exp_add's first checks: a well-formed id no export has yet."""
        if not id_wellformed(export_id):
            raise QMPError("Invalid block export id")
        if self.find_by_id(export_id) is not None:
            raise QMPError(f"Block export id '{export_id}' is already in use")

    async def add(self, export_id: str, node: BlockNode, *, name: str | None, description: str | None,
                  writable: bool, bitmaps: list[Any], allow_inactive: bool = False) -> None:
        """blk_exp_add + nbd_export_create, after the id and node checks.

        ``allow_inactive`` (QEMU 10.0's ``allow-inactive``): an inactive node stays
        inactive, and the export does not keep it from being inactivated.
        """
        graph = self.block.graph

        def create() -> tuple[BlockBackend, int]:
            # Exports serve non-shared storage migration: the node is activated first
            # (blk_exp_add's bdrv_activate), unless the export allows inactive nodes
            # (NBD's export driver supports them), then the BlockBackend takes its
            # permissions (none yet on an inactive node it may leave inactive).
            if not allow_inactive:
                graph.activate(node)
            backend = BlockBackend(graph)
            backend.force_allow_inactivate = allow_inactive
            backend.perm = CONSISTENT_READ | (WRITE if writable else 0)
            backend.shared = ALL
            backend.insert(node)
            try:
                return backend, node.getlength()
            except BaseException:
                backend.remove()
                raise

        backend, size = await self.block.run(create)
        try:
            name = self._check_nbd(node, name, description, bitmaps)
        except QMPError:
            await self.block.run(backend.remove)
            raise
        self.exports.insert(0, Export(export_id, name, description or "", node, writable, backend, size))

    def _check_nbd(self, node: BlockNode, name: str | None, description: str | None,
                   bitmaps: list[Any]) -> str:
        # nbd_export_create's checks, in its order; the export's name.
        if not self.running:
            raise QMPError("NBD server not running")
        name = node.name if name is None else name
        if len(name.encode()) > nbd.MAX_STRING_SIZE:
            raise QMPError(f"export name '{name}' too long")
        if description is not None and len(description.encode()) > nbd.MAX_STRING_SIZE:
            raise QMPError(f"description '{description}' too long")
        if self._find(name) is not None:
            raise QMPError(f"NBD server already has export named '{name}'")
        for bitmap in bitmaps:
            bitmap_name = bitmap if isinstance(bitmap, str) else bitmap.get("name", "")
            raise QMPError(f"Bitmap '{bitmap_name}' is not found"
                           if not any(b.name == bitmap_name for b in node.dirty_bitmaps)
                           else "Exporting dirty bitmaps over NBD is not supported by this server")
        return name

    async def delete(self, export_id: str, hard: bool) -> None:
        """block-export-del / nbd-server-remove."""
        export = self.find_by_id(export_id)
        if export is None:
            raise QMPError(f"Export '{export_id}' is not found")
        if not hard and export.connections:
            err = QMPError(f"export '{export_id}' still in use")
            err.add_note("Use mode='hard' to force client disconnect")
            raise err
        for scope in export.connections:
            scope.cancel()
        await self._delete(export)

    async def _delete(self, export: Export) -> None:
        # blk_exp_delete_bh: gone from the list, the backend released, the event sent.
        if export not in self.exports:
            return
        self.exports.remove(export)
        await self.block.run(export.backend.remove)
        self.events.emit("BLOCK_EXPORT_DELETED", {"id": export.id})

    def query(self) -> list[dict[str, Any]]:
        """query-block-exports (newest first, as QEMU's list)."""
        return [{"id": e.id, "type": "nbd", "node-name": e.node.name, "shutting-down": False}
                for e in self.exports]


def _do_request(export: Export, request: nbd.Request) -> bytes | list[tuple[int, int]] | None:
    """One request's I/O on the export's node (in a worker thread, under the graph lock)."""
    if export.backend.edge is None:
        # The export was deleted while this request waited for the graph lock.
        raise BlockError("Cannot send after transport endpoint shutdown", errno.ESHUTDOWN)
    node = export.node
    command = request.command
    if node.inactive and command != nbd.CMD_READ:
        # nbd_handle_request (QEMU 10.0): on an inactive node (an allow-inactive
        # export) only reads are served; everything else fails with EPERM.
        raise BlockError("export is inactive", errno.EPERM)
    if command == nbd.CMD_READ:
        return node.pread(request.offset, request.length)
    if command == nbd.CMD_WRITE:
        node.pwrite(request.offset, request.data)
    elif command == nbd.CMD_WRITE_ZEROES:
        node.pwrite_zeroes(request.offset, request.length,
                           may_unmap=not request.flags & nbd.CMD_FLAG_NO_HOLE)
    elif command == nbd.CMD_TRIM:
        node.pdiscard(request.offset, request.length)
    elif command == nbd.CMD_FLUSH:
        node.flush()
    elif command == nbd.CMD_BLOCK_STATUS:
        if request.length == 0:
            raise BlockError("need non-zero length", errno.EINVAL)
        return _allocation_extents(node, request)
    if request.flags & nbd.CMD_FLAG_FUA:
        node.flush()
    return None


def _allocation_extents(node: BlockNode, request: nbd.Request) -> list[tuple[int, int]]:
    """nbd/server.c's blockstatus_to_extents: base:allocation of the whole backing chain
    from the request's offset, a hole where nothing holds data, until the request's
    length is covered or the reply holds as many extents as it may."""
    extents = nbd.ExtentArray(1 if request.flags & nbd.CMD_FLAG_REQ_ONE
                              else nbd.MAX_BLOCK_STATUS_EXTENTS)
    offset, remaining = request.offset, request.length
    while remaining:
        try:
            status = block_status_above(node, offset, remaining)
        except BlockError as err:
            raise BlockError("can't get block status", err.errno or errno.EIO) from err
        if status.pnum <= 0:  # the node shrank under the export: nothing more to say
            break
        flags = ((0 if status.flags & BLOCK_DATA else nbd.STATE_HOLE)
                 | (nbd.STATE_ZERO if status.flags & BLOCK_ZERO else 0))
        if not extents.add(status.pnum, flags):
            break
        offset += status.pnum
        remaining -= status.pnum
    return extents.extents


async def _listen(addr: dict[str, Any], take_fd: Callable[[str], int]) -> tuple[trio.SocketListener,
                                                                                 SocketFile | None]:
    """A listener for a SocketAddressLegacy, with QEMU's error texts."""
    kind, data = addr["type"], addr["data"]
    if kind == "unix":
        path: str = data["path"]
        if data.get("abstract", False):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind("\0" + path)
            except OSError as err:
                sock.close()
                raise QMPError(f"Failed to bind socket to {path}: {os.strerror(err.errno or 0)}") from err
            sock.listen(LISTEN_BACKLOG)
            return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), None
        try:
            return bind_unix_file(path)
        except ListenError as err:
            raise QMPError(str(err)) from err
    if kind == "inet":
        host, port = data["host"], data["port"]
        try:
            infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)
        except socket.gaierror as err:
            raise QMPError(f"address resolution failed for {host}:{port}: {err.strerror}") from err
        family, type_, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
        except OSError as err:
            sock.close()
            raise QMPError(f"Failed to bind socket: {os.strerror(err.errno or 0)}") from err
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), None
    if kind == "vsock":
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except (OSError, AttributeError) as err:
            raise QMPError(f"Failed to create socket: {os.strerror(getattr(err, 'errno', 0) or 0)}") from err
        try:
            sock.bind((int(data["cid"]), int(data["port"])))
            sock.listen(LISTEN_BACKLOG)
        except (OSError, ValueError) as err:
            sock.close()
            code = getattr(err, "errno", None) or errno.EINVAL
            raise QMPError(f"Failed to bind socket: {os.strerror(code)}") from err
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), None
    fd = take_fd(data["str"])
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise QMPError(f"Failed to use socket fd {fd}: {os.strerror(err.errno or 0)}") from err
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), None

