"""Helpers for the qcow2 tests: a plain-file ChildIO, backing adapters, QEMU tool calls.

The real file driver and graph are written elsewhere; these stand-ins are just enough to
drive :class:`Qcow2Driver` directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blocklayer.driver import BlockDriver
from blocklayer.errors import BlockError
from blocklayer.qcow2 import Qcow2Driver

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class FileChildIO:
    """A ChildIO over a plain file (pread/pwrite/fdatasync/punch hole)."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False) -> None:
        self.path = str(path)
        self.read_only = read_only
        self.fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        self.flushes = 0

    @property
    def node_name(self) -> str:
        return "file-" + os.path.basename(self.path)

    @property
    def filename(self) -> str:
        return self.path

    @property
    def bottom_filename(self) -> str:
        return self.path

    def _check_writable(self) -> None:
        if self.read_only:
            raise BlockError("Block node is read-only")

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:  # as the real file driver reports it
            raise BlockError(os.strerror(exc.errno or 5), exc.errno) from exc
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes) -> None:
        self._check_writable()
        view = memoryview(data)
        while view:
            try:
                written = os.pwrite(self.fd, view, offset)
            except OSError as exc:  # as the real file driver reports it
                raise BlockError(os.strerror(exc.errno or 5), exc.errno) from exc
            view = view[written:]
            offset += written

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.pwrite(offset, bytes(length))

    def pdiscard(self, offset: int, length: int) -> None:
        self._check_writable()
        _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)
            self.flushes += 1

    def getlength(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        self._check_writable()
        os.ftruncate(self.fd, length)

    def close(self) -> None:
        os.close(self.fd)


class DriverChildIO:
    """A read-only ChildIO over an open driver (a backing node as the graph would give)."""

    def __init__(self, driver: BlockDriver, filename: str) -> None:
        self.driver = driver
        self._filename = filename

    @property
    def node_name(self) -> str:
        return "backing"

    @property
    def filename(self) -> str:
        return self._filename

    @property
    def bottom_filename(self) -> str:
        return self._filename

    def pread(self, offset: int, length: int) -> bytes:
        return self.driver.read(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        raise BlockError("Block node is read-only")

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        raise BlockError("Block node is read-only")

    def pdiscard(self, offset: int, length: int) -> None:
        raise BlockError("Block node is read-only")

    def flush(self) -> None:
        pass

    def getlength(self) -> int:
        return self.driver.getlength()

    def truncate(self, length: int) -> None:
        raise BlockError("Block node is read-only")


class RawBacking(DriverChildIO):
    """A raw backing file: guest offset = file offset, size = file size (whole sectors)."""

    def __init__(self, path: str) -> None:
        self.file = FileChildIO(path, read_only=True)
        self._filename = path
        self.driver = None  # type: ignore[assignment]

    def pread(self, offset: int, length: int) -> bytes:
        return self.file.pread(offset, length)

    def getlength(self) -> int:
        return -(-self.file.getlength() // 512) * 512


def open_qcow2(path: str | os.PathLike[str], *, read_only: bool = False, inactive: bool = False,
               options: Mapping[str, Any] | None = None, with_backing: bool = True,
               driver: Qcow2Driver | None = None) -> Qcow2Driver:
    """Open an image as the graph would: file child, open(), then the backing chain."""
    drv = driver or Qcow2Driver()
    drv.file = FileChildIO(path, read_only=read_only)
    drv.open(dict(options or {}), read_only=read_only, inactive=inactive)
    if with_backing:
        req = drv.backing_request()
        if req is not None:
            fmt = req.format or probe_format(req.path)
            if fmt == "qcow2":
                drv.backing = DriverChildIO(open_qcow2(req.path, read_only=True), req.path)
            else:
                drv.backing = RawBacking(req.path)
    return drv


def close_qcow2(drv: Qcow2Driver) -> None:
    """Inactivate (if writable) and close, closing the file children too."""
    try:
        drv.inactivate()
    except BlockError:
        pass
    drv.close()
    if isinstance(drv.file, FileChildIO):
        drv.file.close()
    if isinstance(drv.backing, DriverChildIO) and isinstance(drv.backing.driver, Qcow2Driver):
        close_qcow2(drv.backing.driver)
    if isinstance(drv.backing, RawBacking):
        drv.backing.file.close()


def probe_format(path: str) -> str:
    """qcow2 by magic, raw otherwise."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output."""
    return subprocess.run(args, capture_output=True, text=True, check=check)


def qemu_img_create(path: Path | str, size: str | int, *, opts: str = "",
                    backing: str | None = None, backing_fmt: str | None = None) -> None:
    """``qemu-img create -f qcow2``."""
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt:
            args += ["-F", backing_fmt]
    run(*args, str(path), str(size))


def qemu_io(path: Path | str, *commands: str, fmt: str = "qcow2", read_only: bool = False,
            check: bool = True) -> str:
    """Run qemu-io commands; raise if any reports a failure (when ``check``)."""
    args = ["qemu-io", "-f", fmt]
    if read_only:
        args.append("-r")
    for c in commands:
        args += ["-c", c]
    proc = run(*args, str(path), check=False)
    out = proc.stdout + proc.stderr
    if check and (proc.returncode != 0 or "failed" in out or "Pattern verification" in out):
        raise AssertionError(f"qemu-io {commands} failed:\n{out}")
    return out


def qemu_check(path: Path | str) -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output=json``: (exit code, parsed result)."""
    proc = run("qemu-img", "check", "--output=json", str(path), check=False)
    try:
        result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        result = {"raw": proc.stdout + proc.stderr}
    if proc.stderr:
        result["stderr"] = proc.stderr
    return proc.returncode, result


def assert_clean(path: Path | str) -> None:
    """qemu-img check says: no corruptions, no leaks, no errors."""
    code, result = qemu_check(path)
    assert code == 0, f"qemu-img check exit {code}: {result}"
    assert result.get("corruptions", 0) == 0, result
    assert result.get("leaks", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result


def qemu_compare(a: Path | str, b: Path | str, fmt_a: str = "qcow2", fmt_b: str = "raw") -> str:
    """``qemu-img compare``; returns its output, raises on difference."""
    proc = run("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b), check=False)
    if proc.returncode != 0:
        raise AssertionError(f"qemu-img compare: {proc.stdout}{proc.stderr}")
    return proc.stdout


def pattern(byte: int, length: int) -> bytes:
    """The bytes qemu-io writes for ``write -P byte``."""
    return bytes([byte]) * length


def crash_ops(seed: int, count: int, size: int, cluster: int) -> list[tuple[str, int, int, int]]:
    """A deterministic storm of (op, offset, length, byte) for the crash test."""
    import random

    rnd = random.Random(seed)
    ops = []
    for i in range(count):
        kind = rnd.random()
        if kind < 0.8:
            length = rnd.choice([1, 100, 512, 4096, cluster, 3 * cluster + 17, 20_000])
            offset = rnd.randrange(0, size - length)
            ops.append(("write", offset, length, i % 251 + 1))
        else:
            length = cluster * rnd.randint(1, 8)
            offset = rnd.randrange(0, (size - length) // cluster) * cluster
            ops.append(("zero" if kind < 0.9 else "discard", offset, length, 0))
    return ops


def apply_op(drv: BlockDriver | None, model: bytearray | None, op: tuple[str, int, int, int]) -> None:
    """Apply one crash_ops entry to a driver and/or a model (cluster-aligned zero/discard)."""
    kind, offset, length, byte = op
    if kind == "write":
        data = bytes([byte]) * length
        if drv is not None:
            drv.write(offset, data)
    else:
        data = bytes(length)
        if drv is not None:
            if kind == "zero":
                drv.write_zeroes(offset, length, may_unmap=True)
            else:
                drv.discard(offset, length)
    if model is not None:
        model[offset:offset + length] = data


def read_u64(path: Path, offset: int) -> int:
    """The big-endian u64 at ``offset`` of the file (a qcow2 header field or table entry)."""
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = int.from_bytes(f.read(8), "big")
        return value


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` of the file (crafting a damaged image)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
