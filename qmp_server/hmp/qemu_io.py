"""QEMU 7.2's qemu-io command interpreter, as HMP ``qemu-io [-d] NODE "CMD"`` runs it.

Supported commands (with qemu-io's aliases): ``read``/``r``, ``write``/``w``, ``readv``,
``writev``, ``discard``/``d``, ``flush``/``f``, ``length``/``l``, ``alloc``/``a``,
``map``, ``aio_read``, ``aio_write``, ``aio_flush`` (completed at once; the only ones a
BlockBackend accounts).
Every other name gets qemu-io's 'command "NAME" not found'.

Where QEMU 7.2 puts the text matters, so :func:`execute_qemu_io` keeps three channels:

* ``stdout`` -- what qemu-io ``printf()``\\ s: results, timing lines, per-command errors,
  usage lines. Under HMP this goes to the *QEMU process's* stdout; the HMP response
  (``human-monitor-command``'s return) stays empty.
* ``stderr`` -- 'command "x" not found', "bad argument count ...", getopt's
  "read: invalid option -- 'x'" and ``write -s FILE`` errors: the QEMU process's stderr.
* ``monitor`` -- what QEMU reports with ``error_report()``/``warn_report()`` while the
  monitor is current: the permission error when the write permission cannot be taken
  (``write`` on a read-only or inactive node: "Block node is read-only") and the hex
  size deprecation warning. This *is* the HMP response text.

Behaviour and texts were established by running QEMU 7.2's qemu-io and qemu-system.
"""

from __future__ import annotations

import enum
import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from blocklayer.backend import AcctType, BlockAcctStats
from blocklayer.errors import BlockError

from .args import HmpArgumentError, hmp_string, skip_space
from .sizes import C_SPACE, SizeError, c_float, cvtnum, cvtnum_error_message, format_size

__all__ = [
    "BDRV_REQUEST_MAX_BYTES",
    "Channel",
    "HmpArgumentError",
    "QemuIoOutput",
    "QemuIoTarget",
    "dump_buffer",
    "execute_qemu_io",
    "format_report",
    "run_qemu_io",
    "split_hmp_qemu_io_args",
]

#: QEMU's largest single request (INT_MAX rounded down to 512 bytes).
BDRV_REQUEST_MAX_BYTES = 2147483136


class QemuIoTarget(Protocol):
    """The block node a qemu-io command runs on.

    Errors are :class:`blocklayer.errors.BlockError`; qemu-io prints ``strerror(errno)``
    when ``errno`` is set, else the message ("write failed: Operation not permitted").
    Range checks against :meth:`getlength` are done here, as QEMU's BlockBackend does, so
    the methods are only called for ranges inside the node (zero-length requests are not
    passed on at all).
    """

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def getlength(self) -> int: ...

    def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """bdrv_is_allocated on the node: (whether the node itself holds the range's first
        part, for how many bytes); 0 bytes past the end."""
        ...

    def acct_stats(self) -> BlockAcctStats | None:
        """The BlockBackend's accounting that ``aio_*`` commands update, if any."""
        ...

    def require_write(self) -> None:
        """Take the write permission that ``write``/``writev``/``discard`` need.

        Called once per such command, after its argument count was checked and before
        its options are parsed (QEMU's order). Raise ``BlockError(message)`` with QEMU's
        text when the permission cannot be taken ("Block node is read-only" for a
        read-only or inactive node, or a permission conflict); the command then prints
        ``message`` to the monitor and does nothing else. QEMU keeps a permission once
        taken for the rest of the backend's life.
        """
        ...


class Channel(enum.Enum):
    """Where a piece of qemu-io's output goes (see the module docstring)."""

    STDOUT = "stdout"
    STDERR = "stderr"
    MONITOR = "monitor"


@dataclass(frozen=True)
class QemuIoOutput:
    """The output of one qemu-io command line, in the order it was produced."""

    chunks: tuple[tuple[Channel, str], ...] = ()

    def _joined(self, channel: Channel) -> str:
        return "".join(text for where, text in self.chunks if where is channel)

    @property
    def stdout(self) -> str:
        """qemu-io's stdout text."""
        return self._joined(Channel.STDOUT)

    @property
    def stderr(self) -> str:
        """qemu-io's stderr text."""
        return self._joined(Channel.STDERR)

    @property
    def monitor(self) -> str:
        """The text QEMU's HMP returns for the command (newlines not yet ``\\r\\n``)."""
        return self._joined(Channel.MONITOR)

    @property
    def text(self) -> str:
        """Everything, in order of production."""
        return "".join(text for _, text in self.chunks)


class _Failure(Exception):
    """An I/O request failed; ``text`` is what follows "<op> failed: "."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    @classmethod
    def from_errno(cls, code: int) -> _Failure:
        return cls(os.strerror(code))


def _failure_text(error: BlockError | OSError) -> str:
    code = error.errno
    if code is not None:
        return os.strerror(code)
    return error.message if isinstance(error, BlockError) else str(error)


class _Abort(Exception):
    """Ends the current command; its output has already been recorded."""


class _Session:
    """State of one command line: the target, the clock and the output so far."""

    def __init__(self, target: QemuIoTarget, clock: Callable[[], float]) -> None:
        self.target = target
        self.clock = clock
        self.chunks: list[tuple[Channel, str]] = []

    def out(self, text: str) -> None:
        self.chunks.append((Channel.STDOUT, text))

    def err(self, text: str) -> None:
        self.chunks.append((Channel.STDERR, text))

    def monitor(self, text: str) -> None:
        self.chunks.append((Channel.MONITOR, text))

    def fail(self, line: str) -> _Abort:
        """Print ``line`` to stdout and return the exception that ends the command."""
        self.out(line + "\n")
        return _Abort()

    def number(self, arg: str) -> int:
        """qemu-io's ``cvtnum`` with its error message; aborts the command on error."""
        try:
            return cvtnum(arg, lambda message: self.monitor(f"warning: {message}\n"))
        except SizeError as error:
            raise self.fail(cvtnum_error_message(error, arg)) from None

    def check_range(self, offset: int, length: int) -> None:
        """The BlockBackend's request check: beyond the end of the node is ``EIO``."""
        size = self.target.getlength()
        if offset > size or size - offset < length:
            raise _Failure.from_errno(errno.EIO)

    def timed(self, operation: Callable[[], bytes | None]) -> tuple[bytes | None, str | None, float]:
        """Run an I/O request: ``(result, failure text or None, elapsed seconds)``."""
        start = self.clock()
        result: bytes | None = None
        failure: str | None = None
        try:
            result = operation()
        except _Failure as error:
            failure = error.text
        except (BlockError, OSError) as error:
            failure = _failure_text(error)
        return result, failure, self.clock() - start


# ---------------------------------------------------------------------------------------
# Report formatting


def _tdiv(value: float, seconds: float) -> float:
    """C's ``value / seconds`` in doubles, including what a zero time gives."""
    if seconds == 0:
        # x86 produces a NaN with the sign bit set for 0.0 / 0.0, printed as "-nan".
        return float("inf") if value else -float("nan")
    return value / seconds


def _timestr(elapsed: float, verbose: bool) -> str:
    whole = int(elapsed)
    fraction = elapsed - whole
    if verbose or whole:
        return f"{whole // 3600}:{whole % 3600 // 60:02d}:{c_float('%05.2f', whole % 60 + fraction)}"
    return f"{c_float('%05.2f', fraction)} sec"


def format_report(
    op: str,
    offset: int,
    count: int,
    total: int,
    elapsed: float,
    ops: int = 1,
    machine: bool = False,
) -> str:
    """qemu-io's statistics after a request (``print_report``), with trailing newline.

    ``op`` is "read", "wrote" or "discard". The default form is two lines::

        read 65536/65536 bytes at offset 0
        64 KiB, 1 ops; 00.00 sec (800.061 MiB/sec and 12800.9831 ops/sec)

    ``machine`` (qemu-io's ``-C``) gives ``bytes,ops,time,bytes/sec,ops/sec``.
    """
    rate = _tdiv(float(total), elapsed)
    op_rate = _tdiv(float(ops), elapsed)
    if machine:
        return f"{total},{ops},{_timestr(elapsed, True)},{c_float('%.3f', rate)},{c_float('%.3f', op_rate)}\n"
    return (
        f"{op} {total}/{count} bytes at offset {offset}\n"
        f"{format_size(float(total))}, {ops} ops; {_timestr(elapsed, False)} "
        f"({format_size(rate)}/sec and {c_float('%.4f', op_rate)} ops/sec)\n"
    )


def _printable(byte: int) -> str:
    # C's isalnum() in the "C" locale: ASCII letters and digits only.
    char = chr(byte)
    return char if char.isascii() and char.isalnum() else "."


def dump_buffer(data: bytes, offset: int) -> str:
    """qemu-io's ``-v`` hex dump: 16 bytes a line, "%08x:  " address, hex, then text."""
    lines = []
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        hex_part = "".join(f"{byte:02x} " for byte in chunk)
        text_part = "".join(_printable(byte) for byte in chunk)
        lines.append(f"{offset + start:08x}:  {hex_part} {text_part}\n")
    return "".join(lines)


# ---------------------------------------------------------------------------------------
# Option parsing


@dataclass(frozen=True)
class _Option:
    letter: str
    value: str | None


@dataclass(frozen=True)
class _OptionError:
    message: str


def _getopt(argv: Sequence[str], optstring: str) -> tuple[list[_Option | _OptionError], list[str]]:
    """GNU ``getopt()`` as qemu-io uses it, with glibc's argument permutation.

    Returns the options in order (ending at the first error, if any) and the operands.
    Options may follow operands ("read 0 512 -v"); "--" ends the options.
    """
    items: list[_Option | _OptionError] = []
    operands: list[str] = []
    index = 1
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            operands.extend(argv[index:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        position = 1
        while position < len(arg):
            letter = arg[position]
            found = optstring.find(letter) if letter not in ":;" else -1
            if found < 0:
                items.append(_OptionError(f"{argv[0]}: invalid option -- '{letter}'"))
                return items, operands
            if optstring[found + 1 : found + 2] != ":":
                items.append(_Option(letter, None))
                position += 1
                continue
            if position + 1 < len(arg):
                items.append(_Option(letter, arg[position + 1 :]))
            elif index < len(argv):
                items.append(_Option(letter, argv[index]))
                index += 1
            else:
                items.append(_OptionError(f"{argv[0]}: option requires an argument -- '{letter}'"))
                return items, operands
            break
    return items, operands


def _strtol_base0(text: str) -> tuple[int, int]:
    """C ``strtol(text, &end, 0)``: ``(value clamped to long, end)``; end is 0 if no number."""
    n = len(text)
    i = 0
    while i < n and text[i] in C_SPACE:
        i += 1
    sign = 1
    if i < n and text[i] in "+-":
        sign = -1 if text[i] == "-" else 1
        i += 1
    if text[i : i + 2] in ("0x", "0X") and i + 2 < n and text[i + 2] in "0123456789abcdefABCDEF":
        base, i = 16, i + 2
    elif text[i : i + 1] == "0":
        base = 8
    else:
        base = 10
    digits = "0123456789abcdefABCDEF"[: base + (6 if base == 16 else 0)]
    start = i
    while i < n and text[i] in digits:
        i += 1
    if i == start:
        return 0, 0
    value = sign * int(text[start:i], base)
    return max(-(1 << 63), min(value, (1 << 63) - 1)), i


def _pattern(session: _Session, arg: str) -> int:
    value, end = _strtol_base0(arg)
    if not 0 <= value <= 255 or end != len(arg):
        raise session.fail(f"{arg} is not a valid pattern byte")
    return value


# ---------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class _Command:
    name: str
    altname: str | None
    argmin: int
    argmax: int  # -1: no limit
    needs_write: bool
    usage: str
    handler: Callable[[_Session, _Command, Sequence[str]], None]


def _options(
    session: _Session, command: _Command, argv: Sequence[str], optstring: str
) -> tuple[Iterator[_Option], list[str]]:
    """The options for a handler to consume in order, and the operands.

    A getopt error is reported (stderr, then the usage line) when iteration reaches it,
    so that an earlier option's own error wins, as in qemu-io.
    """
    items, operands = _getopt(argv, optstring)

    def iterate() -> Iterator[_Option]:
        for item in items:
            if isinstance(item, _OptionError):
                session.err(item.message + "\n")
                raise _usage(session, command)
            yield item

    return iterate(), operands


def _usage(session: _Session, command: _Command) -> _Abort:
    return session.fail(f"{command.name} {command.usage}")


def _read_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    machine = quiet = verbose = pflag = sflag = lflag = vmstate = False
    pattern = 0
    pattern_offset = pattern_count = 0
    options, operands = _options(session, command, argv, "bCl:pP:qs:v")
    for option in options:
        match option.letter:
            case "b":
                vmstate = True
            case "C":
                machine = True
            case "l":
                lflag = True
                pattern_count = session.number(option.value or "")
            case "P":
                pflag = True
                pattern = _pattern(session, option.value or "")
            case "q":
                quiet = True
            case "s":
                sflag = True
                pattern_offset = session.number(option.value or "")
            case "v":
                verbose = True
            # "-p" is accepted and ignored, as in qemu-io.
    if len(operands) != 2:
        raise _usage(session, command)
    offset = session.number(operands[0])
    count = session.number(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        raise session.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {operands[1]}")
    if not pflag and (lflag or sflag):
        raise _usage(session, command)
    if not lflag:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        raise session.fail("pattern verification range exceeds end of read data")
    if vmstate:
        _check_sector_aligned(session, offset, count)

    def operation() -> bytes:
        if vmstate:
            # No VM state area: QEMU answers the same for a raw node.
            raise _Failure.from_errno(errno.ENOTSUP)
        return _read_data(session, offset, count)

    data, failure, elapsed = session.timed(operation)
    if failure is not None or data is None:
        raise session.fail(f"read failed: {failure}")
    if pflag and data.count(pattern, pattern_offset, pattern_offset + pattern_count) != pattern_count:
        session.out(
            f"Pattern verification failed at offset {offset + pattern_offset}, {pattern_count} bytes\n"
        )
    if quiet:
        return
    if verbose:
        session.out(dump_buffer(data, offset))
    session.out(format_report("read", offset, count, count, elapsed, machine=machine))


def _read_data(session: _Session, offset: int, count: int) -> bytes:
    session.check_range(offset, count)
    if count == 0:
        return b""
    data = bytes(session.target.read(offset, count))
    # Defensive: qemu-io's buffer always has the requested size.
    return data[:count].ljust(count, b"\0")


def _check_sector_aligned(session: _Session, offset: int, count: int) -> None:
    if offset % 512:
        raise session.fail(f"{offset} is not a sector-aligned value for 'offset'")
    if count % 512:
        raise session.fail(f"{count} is not a sector-aligned value for 'count'")


def _write_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    machine = quiet = vmstate = compressed = fua = no_fallback = may_unmap = False
    zflag = pflag = sflag = False
    pattern = 0xCD
    source = ""
    options, operands = _options(session, command, argv, "bcCfnpP:qs:uz")
    for option in options:
        match option.letter:
            case "b":
                vmstate = True
            case "c":
                compressed = True
            case "C":
                machine = True
            case "f":
                fua = True
            case "n":
                no_fallback = True
            case "P":
                pflag = True
                pattern = _pattern(session, option.value or "")
            case "q":
                quiet = True
            case "s":
                sflag = True
                source = option.value or ""
            case "u":
                may_unmap = True
            case "z":
                zflag = True
    if len(operands) != 2:
        raise _usage(session, command)
    if vmstate and zflag:
        raise session.fail("-b and -z cannot be specified at the same time")
    if fua and (vmstate or compressed):
        raise session.fail("-f and -b or -c cannot be specified at the same time")
    if no_fallback and not zflag:
        raise session.fail("-n requires -z to be specified")
    if may_unmap and not zflag:
        raise session.fail("-u requires -z to be specified")
    if zflag + pflag + sflag > 1:
        raise session.fail("Only one of -z, -P, and -s can be specified at the same time")
    offset = session.number(operands[0])
    count = session.number(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES and not no_fallback:
        raise session.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {operands[1]}")
    if vmstate or compressed:
        _check_sector_aligned(session, offset, count)
    data = b""
    if not zflag:
        data = _source_data(session, source, count) if sflag else bytes([pattern]) * count

    def operation() -> None:
        # -f (FUA) and -n (no slow fallback) change how QEMU does the request, not its
        # outcome; the target's requests are synchronous and exact anyway.
        if vmstate:
            raise _Failure.from_errno(errno.ENOTSUP)
        session.check_range(offset, count)
        if zflag:
            if count:
                session.target.write_zeroes(offset, count, may_unmap)
        elif compressed:
            raise _Failure.from_errno(errno.ENOTSUP)
        elif count:
            session.target.write(offset, data)

    _, failure, elapsed = session.timed(operation)
    if failure is not None:
        raise session.fail(f"write failed: {failure}")
    if not quiet:
        session.out(format_report("wrote", offset, count, count, elapsed, machine=machine))


def _source_data(session: _Session, file_name: str, count: int) -> bytes:
    """``write -s FILE``: the file's first ``count`` bytes, repeated to fill ``count``."""
    try:
        with open(file_name, "rb") as source:
            head = source.read(count)
    except OSError as error:
        session.err(f"{file_name}: {os.strerror(error.errno or errno.EIO)}\n")
        raise _Abort() from None
    if not head:
        session.err(f"{file_name}: file is empty\n")
        raise _Abort()
    return (head * -(-count // len(head)))[:count]


def _iovec_size(session: _Session, lengths: Sequence[str]) -> int:
    """qemu-io's ``create_iovec`` checks; the vector's total size."""
    total = 0
    for arg in lengths:
        length = session.number(arg)
        if length > BDRV_REQUEST_MAX_BYTES:
            raise session.fail(f"Argument '{arg}' exceeds maximum size {BDRV_REQUEST_MAX_BYTES}")
        if total > BDRV_REQUEST_MAX_BYTES - length:
            raise session.fail(f"The total number of bytes exceed the maximum size {BDRV_REQUEST_MAX_BYTES}")
        total += length
    return total


def _readv_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    _vectored_read(session, command, argv, None)


def _vectored_read(session: _Session, command: _Command, argv: Sequence[str],
                   stats: BlockAcctStats | None) -> None:
    """readv_f, and aio_read_f when ``stats`` is given: the same options (aio_read adds
    -i) and report; only the aio commands are accounted."""
    machine = quiet = verbose = pflag = False
    pattern = 0
    options, operands = _options(session, command, argv, "CP:qv" if stats is None else "CP:iqv")
    for option in options:
        match option.letter:
            case "C":
                machine = True
            case "P":
                pflag = True
                pattern = _pattern(session, option.value or "")
            case "i":
                assert stats is not None
                session.out("injecting invalid read request\n")
                stats.invalid(AcctType.READ)
                return
            case "q":
                quiet = True
            case "v":
                verbose = True
    if len(operands) < 2:
        raise _usage(session, command)
    offset = session.number(operands[0])
    try:
        count = _iovec_size(session, operands[1:])
    except _Abort:
        if stats is not None:
            stats.invalid(AcctType.READ)
        raise
    started = stats.start() if stats is not None else 0
    data, failure, elapsed = session.timed(lambda: _read_data(session, offset, count))
    if failure is not None or data is None:
        if stats is not None:
            stats.done(AcctType.READ, count, started, failed=True)
        raise session.fail(f"readv failed: {failure}")
    if pflag and data.count(pattern) != count:
        session.out(f"Pattern verification failed at offset {offset}, {count} bytes\n")
    if stats is not None:
        stats.done(AcctType.READ, count, started)
    if quiet:
        return
    if verbose:
        session.out(dump_buffer(data, offset))
    session.out(format_report("read", offset, count, count, elapsed, machine=machine))


def _writev_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    _vectored_write(session, command, argv, None)


def _vectored_write(session: _Session, command: _Command, argv: Sequence[str],
                    stats: BlockAcctStats | None) -> None:
    """writev_f, and aio_write_f when ``stats`` is given (it adds -i, -u and -z, and is
    accounted, except with -z: QEMU starts no accounting for it)."""
    machine = quiet = may_unmap = zflag = False
    pattern = 0xCD
    options, operands = _options(session, command, argv, "CfqP:" if stats is None else "CfiqP:uz")
    for option in options:
        match option.letter:
            case "C":
                machine = True
            case "P":
                pattern = _pattern(session, option.value or "")
            case "i":
                assert stats is not None
                session.out("injecting invalid write request\n")
                stats.invalid(AcctType.WRITE)
                return
            case "q":
                quiet = True
            case "u":
                may_unmap = True
            case "z":
                zflag = True
            # "-f" (FUA) does not change the outcome.
    if len(operands) < 2:
        raise _usage(session, command)
    if zflag and len(operands) != 2:
        raise session.fail("-z supports only a single length parameter")
    if may_unmap and not zflag:
        raise session.fail("-u requires -z to be specified")
    offset = session.number(operands[0])
    accounted = stats if not zflag else None
    started = 0
    if zflag:
        count = session.number(operands[1])

        def operation() -> None:
            session.check_range(offset, count)
            if count:
                session.target.write_zeroes(offset, count, may_unmap)
    else:
        try:
            count = _iovec_size(session, operands[1:])
        except _Abort:
            if accounted is not None:
                accounted.invalid(AcctType.WRITE)
            raise
        if accounted is not None:
            started = accounted.start()

        def operation() -> None:
            session.check_range(offset, count)
            if count:
                session.target.write(offset, bytes([pattern]) * count)

    _, failure, elapsed = session.timed(operation)
    if failure is not None:
        if accounted is not None:
            accounted.done(AcctType.WRITE, count, started, failed=True)
        raise session.fail(f"{'writev' if stats is None else 'aio_write'} failed: {failure}")
    if accounted is not None:
        accounted.done(AcctType.WRITE, count, started)
    if not quiet:
        session.out(format_report("wrote", offset, count, count, elapsed, machine=machine))


def _discard_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    machine = quiet = False
    options, operands = _options(session, command, argv, "Cq")
    for option in options:
        if option.letter == "C":
            machine = True
        else:
            quiet = True
    if len(operands) != 2:
        raise _usage(session, command)
    offset = session.number(operands[0])
    count = session.number(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        raise session.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {operands[1]}")

    def operation() -> None:
        session.check_range(offset, count)
        if count:
            session.target.discard(offset, count)

    _, failure, elapsed = session.timed(operation)
    if failure is not None:
        raise session.fail(f"discard failed: {failure}")
    if not quiet:
        session.out(format_report("discard", offset, count, count, elapsed, machine=machine))


def _flush_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    # qemu-io ignores the result of a flush: a failing flush prints nothing either.
    try:
        session.target.flush()
    except (BlockError, OSError):
        pass


def _length_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    try:
        size = session.target.getlength()
    except (BlockError, OSError) as error:
        raise session.fail(f"getlength: {_failure_text(error)}") from None
    session.out(format_size(float(size)) + "\n")


def _alloc_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    # alloc_f: how much of the range this node itself allocates (no backing files, no
    # zero detection: bdrv_is_allocated); the range may run past the end, which then
    # shortens the count printed.
    start = offset = session.number(argv[1])
    count = session.number(argv[2]) if len(argv) == 3 else 512
    remaining = count
    total = 0
    while remaining:
        try:
            allocated, num = session.target.is_allocated(offset, remaining)
        except (BlockError, OSError) as error:
            raise session.fail(f"is_allocated failed: {_failure_text(error)}") from None
        offset += num
        remaining -= num
        if allocated:
            total += num
        if num == 0:
            count -= remaining
            remaining = 0
    session.out(f"{total}/{count} bytes allocated at offset {format_size(float(start))}\n")


def _map_allocated(target: QemuIoTarget, offset: int, length: int) -> tuple[bool, int]:
    # map_is_allocated: the first answer, extended while the following ones agree (a
    # failing later query just ends the run there).
    allocated, total = target.is_allocated(offset, length)
    num = total
    while length > 0:
        offset += num
        length -= num
        try:
            following, num = target.is_allocated(offset, length)
        except (BlockError, OSError):
            break
        if following != allocated or not num:
            break
        total += num
    return allocated, total


def _map_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    # map_f: the node's allocated and unallocated runs; failures are error_report()s,
    # so under HMP they are the monitor's reply.
    try:
        remaining = session.target.getlength()
    except (BlockError, OSError) as error:
        session.monitor(f"Failed to query image length: {_failure_text(error)}\n")
        raise _Abort() from None
    offset = 0
    while remaining:  # every pass moves on by num > 0 bytes
        try:
            allocated, num = _map_allocated(session.target, offset, remaining)
        except (BlockError, OSError) as error:
            session.monitor(f"Failed to get allocation status: {_failure_text(error)}\n")
            raise _Abort() from None
        if not num:
            session.monitor("Unexpected end of image\n")
            raise _Abort()
        state = "    allocated" if allocated else "not allocated"
        session.out(f"{format_size(float(num))} ({num:#x}) bytes {state} at offset "
                    f"{format_size(float(offset))} ({offset:#x})\n")
        offset += num
        remaining -= num


def _sleep_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    value, end = _strtol_base0(argv[1])
    if end == 0 or end != len(argv[1]) or value < 0:
        raise session.fail(f"{argv[1]} is not a valid number")
    # qemu-io turns milliseconds into int64 nanoseconds without an overflow check; a
    # product that wraps to a negative deadline has already passed, so no wait at all.
    nanoseconds = (value * 1_000_000) & ((1 << 64) - 1)
    if nanoseconds < 1 << 63:
        time.sleep(nanoseconds / 1e9)  # qemu-io runs in a worker thread, off the event loop


class _NoStats(BlockAcctStats):
    """Accounting nobody reads (qemu-io on a node: QEMU's temporary BlockBackend)."""


def _stats(session: _Session) -> BlockAcctStats:
    getter = getattr(session.target, "acct_stats", None)
    stats = getter() if getter is not None else None
    return stats if isinstance(stats, BlockAcctStats) else _NoStats()


def _aio_read_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    # aio_read_f: the request completes before the command returns here; its report
    # (aio_read_done) follows at once.
    _vectored_read(session, command, argv, _stats(session))


def _aio_write_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    _vectored_write(session, command, argv, _stats(session))


def _aio_flush_f(session: _Session, command: _Command, argv: Sequence[str]) -> None:
    # aio_flush_f: waits for the outstanding requests (there are none left here) and is
    # accounted as a flush of 0 bytes; it does not flush the image.
    stats = _stats(session)
    stats.done(AcctType.FLUSH, 0, stats.start())


_COMMANDS: tuple[_Command, ...] = (
    _Command(
        "read", "r", 2, -1, False,
        "[-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
        _read_f,
    ),
    _Command(
        "readv", None, 2, -1, False,
        "[-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset",
        _readv_f,
    ),
    _Command(
        "write", "w", 2, -1, True,
        "[-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
        _write_f,
    ),
    _Command(
        "writev", None, 2, -1, True,
        "[-Cfq] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset",
        _writev_f,
    ),
    _Command(
        "discard", "d", 2, -1, True,
        "[-Cq] off len -- discards a number of bytes at a specified offset",
        _discard_f,
    ),
    _Command(
        "aio_read", None, 2, -1, False,
        "[-Ciqv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes",
        _aio_read_f,
    ),
    _Command(
        "aio_write", None, 2, -1, True,
        "[-Cfiquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
        _aio_write_f,
    ),
    _Command("aio_flush", None, 0, 0, False, "", _aio_flush_f),
    _Command("alloc", "a", 1, 2, False, "", _alloc_f),
    _Command("map", None, 0, 0, False, "", _map_f),
    _Command("flush", "f", 0, 0, False, "", _flush_f),
    _Command("length", "l", 0, 0, False, "", _length_f),
    _Command("sleep", None, 1, 1, False, "", _sleep_f),
)  # fmt: skip

_BY_NAME: dict[str, _Command] = {
    name: command for command in _COMMANDS for name in (command.name, command.altname) if name is not None
}


def _argument_count_error(command: _Command, typed: str, count: int) -> str | None:
    if count >= command.argmin and (command.argmax == -1 or count <= command.argmax):
        return None
    prefix = f"bad argument count {count} to {typed}, expected"
    if command.argmax == -1:
        return f"{prefix} at least {command.argmin} arguments"
    if command.argmin == command.argmax:
        return f"{prefix} {command.argmin} arguments"
    return f"{prefix} between {command.argmin} and {command.argmax} arguments"


def execute_qemu_io(
    target: QemuIoTarget, command_line: str, clock: Callable[[], float] = time.perf_counter
) -> QemuIoOutput:
    """Execute one qemu-io command line and return its output, split by channel.

    ``command_line`` is the CMD of HMP ``qemu-io NODE "CMD"`` after HMP's unquoting.
    ``clock`` (seconds) times the I/O request for the statistics line.
    """
    session = _Session(target, clock)
    # qemu-io splits on single spaces only; tabs stay inside words.
    argv = [word for word in command_line.split(" ") if word]
    if not argv:
        return QemuIoOutput()
    command = _BY_NAME.get(argv[0])
    if command is None:
        session.err(f'command "{argv[0]}" not found\n')
        return QemuIoOutput(tuple(session.chunks))
    count_error = _argument_count_error(command, argv[0], len(argv) - 1)
    if count_error is not None:
        session.err(count_error + "\n")
        return QemuIoOutput(tuple(session.chunks))
    try:
        if command.needs_write:
            try:
                target.require_write()
            except BlockError as error:
                session.monitor(error.message + "\n")
                raise _Abort() from None
        command.handler(session, command, argv)
    except _Abort:
        pass
    return QemuIoOutput(tuple(session.chunks))


def run_qemu_io(
    target: QemuIoTarget, command_line: str, clock: Callable[[], float] = time.perf_counter
) -> str:
    """Execute one qemu-io command line (the quoted CMD part of HMP ``qemu-io NODE "CMD"``)
    and return qemu-io's output text.

    All channels are joined in order of production; use :func:`execute_qemu_io` to tell
    the HMP response (``monitor``) from what QEMU 7.2 prints to its stdout/stderr.
    """
    return execute_qemu_io(target, command_line, clock).text


def split_hmp_qemu_io_args(args: str) -> tuple[bool, str, str]:
    """Parse the arguments of HMP ``qemu-io`` (``[-d] device "command"``) as QEMU does.

    ``args`` is the HMP line after the command name. Returns ``(qdev, device, command)``:
    ``qdev`` is True with ``-d`` (the device is a qdev ID rather than a drive or node name).
    Words may be "double-quoted" with the escapes \\n \\r \\\\ \\' \\"; an unquoted word ends
    at whitespace. Raises :class:`HmpArgumentError` (a ValueError) with QEMU's message.
    """
    # The monitor receives a C string: anything after a NUL does not exist for it.
    args = args.split("\0", 1)[0]
    stdout: list[str] = []
    qdev = False
    pos = skip_space(args, 0)
    if pos < len(args) and args[pos] == "-":
        letter = args[pos + 1 : pos + 2]
        if letter != "d":
            # QEMU prints the letter with %c; at the end of the line that is the NUL, which
            # also ends the monitor's C string, newline included.
            raise HmpArgumentError(f"qemu-io: unsupported option -{letter}", "qemu-io",
                                   newline=bool(letter))
        qdev = True
        pos += 2
    parsed = hmp_string(args, pos, stdout)
    if parsed is None:
        raise HmpArgumentError("qemu-io: block device name expected", "qemu-io", "".join(stdout))
    device, pos = parsed
    parsed = hmp_string(args, pos, stdout)
    if parsed is None:
        raise HmpArgumentError("qemu-io: string expected", "qemu-io", "".join(stdout))
    command, pos = parsed
    if skip_space(args, pos) < len(args):
        raise HmpArgumentError("qemu-io: extraneous characters at the end of line", "qemu-io")
    return qdev, device, command
