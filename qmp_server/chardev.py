"""Character devices that carry monitors: ``-chardev``, ``-mon``, ``-qmp``, ``-monitor``.

QEMU connects a monitor to a character device. The ones management tools use:

* ``socket`` listening (``server=on``) on a path, a TCP port or an inherited listening
  descriptor (libvirt binds the socket itself and passes ``fd=N``);
* ``socket`` connected: an inherited connected descriptor (QEMU's Python harness passes
  one end of a socketpair as ``fd=N``), or a path/port without ``server=on``, which QEMU
  connects to at start-up (the 7.2 harness listens and lets QEMU connect);
* ``stdio``, and ``null``.

This module parses the options in QEMU's syntax with QEMU's error texts and opens the
endpoints; :mod:`qmp_server.app` serves them.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass, field

import trio

from .unixsocket import LISTEN_BACKLOG, ListenError, SocketFile, bind_unix_file


class ChardevError(Exception):
    """A bad -chardev/-mon/-qmp/-monitor option; the message is QEMU's text."""


@dataclass
class Chardev:
    """One character device, as ``-chardev`` (or a legacy ``-qmp``/``-monitor``) made it."""

    id: str
    backend: str  # "socket", "stdio" or "null"
    option: str  # the option as typed, for error messages: "-chardev socket,..."
    path: str | None = None
    host: str | None = None
    port: str | None = None
    fd: int | None = None
    server: bool = False
    wait: bool = True

    def filename(self, connected: bool) -> str:
        """The ``filename`` of query-chardev, as QEMU's qemu_chr_compute_filename."""
        if self.backend != "socket":
            return self.backend
        if self.path is not None:
            address = f"unix:{self.path}"
        elif self.host is not None:
            address = f"tcp:{self.host}:{self.port}"
        else:
            address = f"fd:{self.fd}"
        if self.server:
            address += ",server=on"
        return address if connected else f"disconnected:{address}"


@dataclass
class MonitorSpec:
    """One monitor: a character device and a mode (QMP ``control`` or HMP ``readline``)."""

    chardev: Chardev
    control: bool
    pretty: bool = False


@dataclass
class Chardevs:
    """Every -chardev and monitor of a command line, in order."""

    devices: dict[str, Chardev] = field(default_factory=dict)
    monitors: list[MonitorSpec] = field(default_factory=list)
    _compat: int = 0

    def add(self, device: Chardev) -> None:
        """Register ``device``; QEMU refuses a second device with the same id."""
        if device.id in self.devices:
            raise ChardevError(f"{device.option}: Duplicate ID '{device.id}' for chardev")
        self.devices[device.id] = device

    def parse_chardev(self, text: str) -> None:
        """``-chardev BACKEND,id=ID,...``."""
        self.add(_chardev_from_options(split_options(text), f"-chardev {text}", None))

    def parse_mon(self, text: str) -> MonitorSpec:
        """``-mon chardev=ID[,mode=control|readline][,pretty=on]`` (resolved by :meth:`resolve`)."""
        option = f"-mon {text}"
        settings: dict[str, str] = {}
        for item in split_options(text):
            key, _, value = item.partition("=")
            if key not in ("chardev", "mode", "pretty", "id"):
                raise ChardevError(f"{option}: Invalid parameter '{key}'")
            settings[key] = value
        mode = settings.get("mode", "readline")
        if mode not in ("control", "readline"):
            raise ChardevError(f"{option}: Parameter 'mode' does not accept value '{mode}'")
        pretty = parse_bool(settings.get("pretty", "off"), "pretty", option)
        name = settings.get("chardev")
        if not name:
            raise ChardevError(f"{option}: Parameter 'chardev' is missing")
        # Resolved once every -chardev is known (QEMU creates chardevs before monitors).
        spec = MonitorSpec(Chardev(name, "", option), mode == "control", pretty)
        self.monitors.append(spec)
        return spec

    def parse_legacy(self, text: str, control: bool) -> None:
        """``-qmp SPEC`` (control) or ``-monitor SPEC`` (readline): a chardev of its own."""
        option = f"-{'qmp' if control else 'monitor'} {text}"
        if text == "none":
            return
        parts = split_options(text)
        address, settings = parts[0], parts[1:]
        name = f"compat_monitor{self._compat}"
        self._compat += 1
        pretty = False
        rest: list[str] = []
        for item in settings:
            key, _, value = item.partition("=")
            if key == "pretty":
                pretty = parse_bool(value if "=" in item else "on", key, option)
            else:
                rest.append(item)
        if address in ("stdio", "null"):
            device = _chardev_from_options([address, *rest], option, name)
        elif address.startswith("unix:"):
            device = _chardev_from_options(["socket", f"path={address[5:]}", *rest], option, name)
        elif address.startswith("tcp:"):
            host, _, port = address[4:].rpartition(":")
            device = _chardev_from_options(["socket", f"host={host}", f"port={port}", *rest], option, name)
        else:
            raise ChardevError(f"{option}: '{address}' is not a valid char driver")
        self.add(device)
        self.monitors.append(MonitorSpec(device, control, pretty))

    def resolve(self) -> None:
        """Attach each ``-mon`` to its chardev; QEMU's text for an unknown one."""
        for spec in self.monitors:
            if spec.chardev.backend:
                continue
            device = self.devices.get(spec.chardev.id)
            if device is None:
                raise ChardevError(f'{spec.chardev.option}: chardev "{spec.chardev.id}" not found')
            spec.chardev = device


def split_options(text: str) -> list[str]:
    """QEMU's option syntax: ',' separates, ',,' is a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def parse_bool(value: str, key: str, option: str) -> bool:
    """QEMU's on/off values (qapi_bool_parse)."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise ChardevError(f"{option}: Parameter '{key}' expects 'on' or 'off'")


_SOCKET_KEYS = {"path", "host", "port", "fd", "server", "wait", "nowait", "telnet", "tn3270",
                "websocket", "reconnect", "nodelay", "abstract", "tight", "ipv4", "ipv6", "to",
                "logfile", "logappend", "mux", "signal"}


def _chardev_from_options(parts: list[str], option: str, name: str | None) -> Chardev:
    backend, settings = parts[0], parts[1:]
    if backend not in ("socket", "stdio", "null"):
        raise ChardevError(f"{option}: '{backend}' is not a valid char driver name")
    values: dict[str, str | None] = {}
    for item in settings:
        key, has_value, value = item.partition("=")
        values[key] = value if has_value else None
    ident = values.pop("id", None) or name
    if not ident:
        raise ChardevError(f"{option}: chardev: no id specified")
    device = Chardev(ident, backend, option)
    if backend != "socket":
        for key in values:
            if key not in ("mux", "signal", "logfile", "logappend"):
                raise ChardevError(f"{option}: Invalid parameter '{key}'")
        return device
    for key, setting in values.items():
        if key not in _SOCKET_KEYS:
            raise ChardevError(f"{option}: Invalid parameter '{key}'")
        if key in ("server", "wait"):
            setattr(device, key, parse_bool("on" if setting is None else setting, key, option))
        elif key == "nowait":
            device.wait = False
    device.path = values.get("path")
    device.host = values.get("host")
    device.port = values.get("port")
    if device.path is None and device.host is None:
        # QEMU's qemu_chr_parse_socket: with neither a path nor a host, fd= is required.
        fd_text = values.get("fd") or ""
        if not (fd_text.isascii() and fd_text.isdigit()):
            raise ChardevError(f"{option}: Unable to parse FD number {fd_text}")
        device.fd = int(fd_text)
    elif device.host is not None and not device.port:
        raise ChardevError(f"{option}: chardev: socket: no port given")
    return device


# ------------------------------------------------------------------------ opening


@dataclass
class Endpoint:
    """An opened character device: clients come from ``listener``, or it is ``stream``."""

    listener: trio.SocketListener | None = None
    stream: trio.abc.Stream | None = None
    #: The socket file we created, to remove (only it) on exit.
    socket_file: SocketFile | None = None


def open_chardev(device: Chardev) -> Endpoint:
    """Bind, connect or adopt ``device``; raises :class:`ChardevError` with QEMU's text."""
    try:
        if device.backend == "null":
            return Endpoint()
        if device.backend == "stdio":
            return Endpoint(stream=trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)),
                                                      trio.lowlevel.FdStream(os.dup(0))))
        if device.fd is not None:
            return _inherited(device)
        if device.server:
            if device.path is not None:
                listener, socket_file = bind_unix_file(device.path)
                return Endpoint(listener=listener, socket_file=socket_file)
            sock = socket.create_server((device.host or "0.0.0.0", int(device.port or 0)),
                                        backlog=LISTEN_BACKLOG)
            return Endpoint(listener=trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        return Endpoint(stream=_connect(device))
    except ListenError as err:
        raise ChardevError(f"{device.option}: {err}") from err
    except (OSError, ValueError) as err:
        message = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err)
        raise ChardevError(f"{device.option}: {message}") from err


def _inherited(device: Chardev) -> Endpoint:
    fd = device.fd
    assert fd is not None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        raise ChardevError(f"{device.option}: File descriptor '{fd}' is not a socket") from err
    if not stat.S_ISSOCK(mode):
        raise ChardevError(f"{device.option}: File descriptor '{fd}' is not a socket")
    sock = socket.socket(fileno=fd)
    # libvirt passes a socket it bound and listens on; QEMU's harness one end of a pair.
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return Endpoint(listener=trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return Endpoint(stream=trio.SocketStream(trio.socket.from_stdlib_socket(sock)))


def _connect(device: Chardev) -> trio.abc.Stream:
    if device.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = device.path
        where = device.path
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (device.host or "localhost", int(device.port or 0))
        where = f"{device.host}:{device.port}"
    try:
        sock.connect(target)
    except OSError as err:
        sock.close()
        reason = os.strerror(err.errno or errno.ECONNREFUSED)
        raise ChardevError(f"{device.option}: Failed to connect to '{where}': {reason}") from err
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
