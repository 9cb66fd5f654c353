"""Byte sizes as QEMU 7.2 parses and prints them.

:func:`qemu_strtosz` follows ``qemu_strtosz()`` of QEMU 7.2 (the parser behind qemu-io's
offsets and lengths), :func:`cvtnum` adds qemu-io's ``int64_t`` limit, and
:func:`format_size` follows qemu-io's ``cvtstr()`` ("64 KiB", "1.500 KiB", "512 bytes").
The behaviour was established by running QEMU 7.2's qemu-io, not by translating its code.
"""

from __future__ import annotations

import errno
import math
import re
from collections.abc import Callable

__all__ = [
    "C_SPACE",
    "INT64_MAX",
    "SizeError",
    "c_float",
    "cvtnum",
    "cvtnum_error_message",
    "format_size",
    "qemu_strtosz",
    "qemu_strtosz_mib",
    "qemu_strtou64",
]

INT64_MAX = (1 << 63) - 1
_UINT64_LIMIT = 1 << 64

# C's isspace() in the "C" locale; Python's str.isspace() also accepts Unicode spaces.
C_SPACE = frozenset(" \t\n\v\f\r")
_DEC_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_OCT_DIGITS = frozenset("01234567")

# What strtod() consumes when it starts at the '.' of "1.5k": digits, then an exponent
# only if digits follow the 'e'. ("." alone is no number at all.)
_FRACTION = re.compile(r"\.[0-9]+(?:[eE][+-]?[0-9]+)?")

_SUFFIXES = "BKMGTPE"


class SizeError(ValueError):
    """A size that QEMU rejects; ``errno`` is ``EINVAL`` or ``ERANGE`` like QEMU's return code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{errno.errorcode.get(code, code)}: {text!r}")
        self.errno = code
        self.text = text


def _strtoull(text: str, base: int) -> tuple[int, int, int]:
    """C ``strtoull(text, &end, base)`` for base 10 or 16: ``(value, end, error)``.

    ``error`` is 0, ``EINVAL`` when nothing was converted (``end`` is then 0) or ``ERANGE``
    when the magnitude does not fit 64 bits (``end`` is then past the digits).
    """
    n = len(text)
    i = 0
    while i < n and text[i] in C_SPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    digits = _DEC_DIGITS
    if base == 16:
        digits = _HEX_DIGITS
        # "0x" only counts as a prefix when a hex digit follows; "0xg" converts the "0".
        if text[i : i + 2] in ("0x", "0X") and i + 2 < n and text[i + 2] in _HEX_DIGITS:
            i += 2
    start = i
    while i < n and text[i] in digits:
        i += 1
    if i == start:
        return 0, 0, errno.EINVAL
    value = int(text[start:i], base)
    if value >= _UINT64_LIMIT:
        return _UINT64_LIMIT - 1, i, errno.ERANGE
    if negative:
        value = -value % _UINT64_LIMIT
    return value, i, 0


def _suffix_multiplier(char: str) -> int:
    index = _SUFFIXES.find(char.upper()) if len(char) == 1 else -1
    return 1024**index if index >= 0 else 0


def _parse(text: str, warn: Callable[[str], None] | None,
           default_multiplier: int = 1) -> tuple[int, int, int]:
    """The core of ``qemu_strtosz``: ``(error, end, value)`` before the end-of-string check.

    ``default_multiplier`` is the unit of a number without a suffix (qemu_strtosz_MiB's).
    """
    n = len(text)
    value, end, error = _strtoull(text, 10)
    if error:
        return error, end, 0
    if "-" in text[:end]:
        return errno.EINVAL, 0, 0
    fraction_bits = 0
    is_hex = False
    if value == 0 and end < n and text[end] in "xX":
        value, end, error = _strtoull(text, 16)
        if error:
            return error, end, 0
        if end < n and text[end] == ".":
            return errno.EINVAL, 0, 0
        is_hex = True
    elif end < n and text[end] == ".":
        match = _FRACTION.match(text, end)
        if match is None:
            # "1." and "1.k" are accepted: the lone dot is skipped.
            end += 1
        elif "e" in match.group().lower():
            return errno.EINVAL, 0, 0
        else:
            # QEMU keeps the fraction as a 64-bit fixed-point number. A fraction that rounds
            # up to 1.0 ("1.99999999999999999999k") overflows that conversion, which on x86
            # yields 0: QEMU 7.2 parses that example as 1024, and so do we.
            scaled = int(float(match.group()) * 2.0**64)
            fraction_bits = scaled if scaled < _UINT64_LIMIT else 0
            end = match.end()
    multiplier = _suffix_multiplier(text[end] if end < n else "")
    if multiplier:
        if is_hex and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        end += 1
    else:
        multiplier = default_multiplier
    if multiplier == 1:
        if fraction_bits:
            # A fraction needs a scaling suffix: "1.5" and "1.5b" are not byte counts.
            return errno.EINVAL, 0, 0
    else:
        scaled_fraction = fraction_bits * multiplier
        # Exact fixed-point product, rounded half up on the bit below the binary point.
        value = value * multiplier + (scaled_fraction >> 64) + ((scaled_fraction >> 63) & 1)
        if value >= _UINT64_LIMIT:
            return errno.ERANGE, end, 0
    return 0, end, value


def qemu_strtou64(text: str) -> int | None:
    """QEMU 7.2's ``qemu_strtou64(text, NULL, 0, &value)``: C's ``strtoull`` in base 0
    (``0x`` hex, a leading ``0`` octal), the whole string consumed; a minus sign wraps
    ("-1" is 2^64 - 1), as strtoull's does. None where QEMU fails (nothing converted,
    characters left over, or a magnitude beyond 64 bits)."""
    n = len(text)
    i = 0
    while i < n and text[i] in C_SPACE:
        i += 1
    negative = i < n and text[i] == "-"
    if i < n and text[i] in "+-":
        i += 1
    base, digits = 10, _DEC_DIGITS
    if text[i : i + 2] in ("0x", "0X") and i + 2 < n and text[i + 2] in _HEX_DIGITS:
        base, digits = 16, _HEX_DIGITS
        i += 2
    elif text[i : i + 1] == "0":
        base, digits = 8, _OCT_DIGITS
    start = i
    while i < n and text[i] in digits:
        i += 1
    if i == start or i < n:
        return None
    value = int(text[start:i], base)
    if value >= _UINT64_LIMIT:
        return None
    return -value % _UINT64_LIMIT if negative else value


def qemu_strtosz_mib(text: str) -> tuple[int, int] | None:
    """QEMU 7.2's ``qemu_strtosz_MiB`` with an end pointer, as HMP's ``o`` arguments use
    it: ``(value, end)`` where a number without a suffix counts MiB and parsing stops at
    the first character that is no part of the size; None where QEMU fails."""
    error, end, value = _parse(text, None, 1 << 20)
    if error or end == 0:
        return None
    return value, end


def qemu_strtosz(text: str, warn: Callable[[str], None] | None = None) -> int:
    """Parse a byte count like QEMU 7.2's ``qemu_strtosz()`` (default unit: bytes).

    Accepts decimal integers, ``0x`` hex, decimal fractions with a suffix ("1.5k") and the
    suffixes B, K, M, G, T, P, E (powers of 1024, any case). ``warn`` receives QEMU's
    deprecation warning for hex numbers with a suffix ("0x10k"), which QEMU still accepts.
    Raises :class:`SizeError` (``EINVAL`` or ``ERANGE``) where QEMU returns an error.
    """
    error, end, value = _parse(text, warn)
    if end < len(text):
        # Trailing characters make any input invalid, even one that overflowed first.
        error = errno.EINVAL
    if error:
        raise SizeError(error, text)
    return value


def cvtnum(text: str, warn: Callable[[str], None] | None = None) -> int:
    """qemu-io's ``cvtnum()``: :func:`qemu_strtosz` limited to non-negative ``int64_t``."""
    value = qemu_strtosz(text, warn)
    if value > INT64_MAX:
        raise SizeError(errno.ERANGE, text)
    return value


def cvtnum_error_message(error: SizeError, arg: str) -> str:
    """qemu-io's message for an argument :func:`cvtnum` rejected (without newline)."""
    if error.errno == errno.EINVAL:
        return f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
    if error.errno == errno.ERANGE:
        return f"Parsing error: argument too large -- {arg}"
    return f"Parsing error: {arg}"


def c_float(spec: str, value: float) -> str:
    """``printf(spec, value)`` for one double, including glibc's "-nan" for negative NaNs."""
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return spec % value


# (unit, suffix), largest first; the value is compared and divided as a double.
_UNITS: tuple[tuple[int, str], ...] = (
    (1 << 60, " EiB"),
    (1 << 50, " PiB"),
    (1 << 40, " TiB"),
    (1 << 30, " GiB"),
    (1 << 20, " MiB"),
    (1 << 10, " KiB"),
)


def format_size(value: float) -> str:
    """qemu-io's ``cvtstr()``: "1 MiB", "1.500 KiB", "512 bytes", "838.633497 bytes".

    Three decimals in binary units, six below 1 KiB; a fraction part starting with ".000"
    is cut off entirely (so 2147483136 prints as "2 GiB").
    """
    suffix = " bytes"
    # qemu-io formats into a 64-byte buffer, leaving room for the suffix.
    text = c_float("%f", value)[:57]
    for unit, unit_suffix in _UNITS:
        if value >= unit:
            suffix = unit_suffix
            text = c_float("%.3f", value / unit)[:59]
            break
    cut = text.find(".000")
    return (text[:cut] if cut >= 0 else text) + suffix
