"""Listening UNIX sockets that never delete what is not theirs, and the fd limit.

Used by the monitors (chardev), the migration listener and the server alike.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat

import trio

# The listen() backlog: 1,000 clients connecting at once all get in (the kernel caps it
# at net.core.somaxconn, 4096 by default).
LISTEN_BACKLOG = 4096


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


class SocketFile:
    """The file a UNIX socket was bound to, remembered so that only that file is removed."""

    def __init__(self, path: str) -> None:
        # Absolute: -daemonize changes to / before we exit.
        self.path = os.path.abspath(path)
        st = os.lstat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        """Unlink the socket file if it is still the one we created.

        Someone may have removed it while we ran and put a file or another server's
        socket in its place; that is not ours to delete.
        """
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity and stat.S_ISSOCK(st.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def bind_unix(path: str) -> trio.SocketListener:
    """A listening UNIX socket at ``path``, mode 0600, replacing only a stale socket."""
    return bind_unix_file(path)[0]


def bind_unix_file(path: str) -> tuple[trio.SocketListener, SocketFile]:
    """:func:`bind_unix`, and the socket file, to remove it (and only it) on exit."""
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
    try:
        socket_file = SocketFile(path)
    except OSError as err:
        sock.close()
        raise ListenError(f"{path}: {os.strerror(err.errno or 0)}") from err
    sock.listen(LISTEN_BACKLOG)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), socket_file


def raise_fd_limit() -> None:
    """Raise the soft limit on open descriptors to the hard limit.

    Each client costs a descriptor and the usual soft limit (1024) is below what a
    server of many clients needs. QEMU does the same since 9.0 (os_setup_limits()).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
