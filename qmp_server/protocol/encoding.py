"""Encoding server output exactly as QEMU's monitor does.

QEMU writes one compact JSON object per line, ``", "``/``": "`` separators, every code
point outside printable ASCII escaped as ``\\uXXXX`` with upper-case hex (surrogate pairs
above the BMP), numbers that are doubles as C's ``%.17g`` prints them, and CRLF line ends.
Every object's members come in the order QEMU walks the QDict holding them
(:mod:`.qdict`): QEMU builds all its output as QDicts, so callers need not order anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from .qdict import qemu_ordered

_encoder = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": "), allow_nan=False)


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# JSONEncoder.encode() builds a new C encoder on every call, which is half the cost of
# encoding a small reply; build it once. (No circular-reference markers: replies are
# trees, and excessive depth falls back to _encode_deep below.)
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_encoder is not None:
    _encode_fast: Callable[[Any], str] = partial(
        lambda encoder, value: "".join(encoder(value, 0)),
        _c_encoder(None, _not_serializable, json.encoder.encode_basestring_ascii, None,
                   ": ", ", ", False, False, False))
else:  # pragma: no cover - other Python implementations
    _encode_fast = _encoder.encode
# Only for messages holding inf/nan (an echoed "id": 1e400): QEMU prints C's "inf".
_nan_encoder = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": "), allow_nan=True)
_NAN_OR_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(-?Infinity|NaN)')
_C_SPELLING = {"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan"}


def _c_nan(match: re.Match[str]) -> str:
    token = match.group(1)
    return match.group(0) if token is None else _C_SPELLING[token]


class PreEncoded(str):
    """JSON text produced elsewhere (already in QEMU's output form), spliced in verbatim.

    Used for large, cacheable results (query-named-block-nodes) that would otherwise be
    re-encoded on every call.
    """
# Python writes lower-case hex; QEMU upper-case. A preceding escaped backslash (\\) must
# not be mistaken for the start of an escape, hence the alternation.
_ESCAPE = re.compile(r"\\\\|\\u([0-9a-f]{4})")


# Python writes a float as its shortest repr ("0.1", "2.0", "1e+300"); QEMU's
# qnum_to_string() uses "%.17g" ("0.10000000000000001", "2", "1.0000000000000001e+300").
# A float's repr is a number token (after "[", ": " or ", ", or alone) with "." or an
# exponent; integers never are. The exact, string-aware rewrite only runs when this cheap
# test finds such a token, which text inside strings (paths like "i123.qcow2") rarely
# mimics; when it does, the exact pass leaves strings alone anyway.
_MAYBE_FLOAT = re.compile(r"(?:^|[\[ ])-?\d+(?:\.\d|e)")
_FLOAT_OR_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(-?\d+(?:\.\d+)?e[-+]\d+|-?\d+\.\d+)')


def _qemu_float(match: re.Match[str]) -> str:
    number = match.group(1)
    if number is None:
        return match.group(0)  # a string: left alone
    return f"{float(number):.17g}"


_encode_string = json.encoder.encode_basestring_ascii


class _Text(str):
    """Literal output in the iterative encoder's work stack."""


def _encode_deep(message: Any) -> str:
    """What ``_encoder.encode`` writes, without recursion (for nesting Python's limit refuses).

    QEMU accepts input nested 1024 deep, and an ``id`` is echoed whole.
    """
    out: list[str] = []
    stack: list[Any] = [message]
    while stack:
        item = stack.pop()
        if type(item) is _Text:
            out.append(item)
        elif isinstance(item, str):
            out.append(_encode_string(item))
        elif item is None:
            out.append("null")
        elif item is True:
            out.append("true")
        elif item is False:
            out.append("false")
        elif isinstance(item, int):
            out.append(int.__repr__(item))
        elif isinstance(item, float):
            out.append(_encoder.encode(item))
        elif isinstance(item, dict):
            if not item:
                out.append("{}")
                continue
            out.append("{")
            stack.append(_Text("}"))
            members = list(item.items())
            for index in range(len(members) - 1, -1, -1):
                key, value = members[index]
                if not isinstance(key, str):
                    key = _encoder.encode(key).strip('"')
                stack.append(value)
                stack.append(_Text(("" if index == 0 else ", ") + _encode_string(key) + ": "))
        elif isinstance(item, (list, tuple)):
            if not item:
                out.append("[]")
                continue
            out.append("[")
            stack.append(_Text("]"))
            for index in range(len(item) - 1, -1, -1):
                stack.append(item[index])
                if index:
                    stack.append(_Text(", "))
        else:
            raise TypeError(f"Object of type {type(item).__name__} is not JSON serializable")
    return "".join(out)


def _upper(match: re.Match[str]) -> str:
    hexdigits = match.group(1)
    if hexdigits is None:
        return match.group(0)
    return "\\u" + hexdigits.upper()


def encode(message: Any) -> bytes:
    """One QMP output line (ASCII, CRLF-terminated) for ``message``."""
    if type(message) is dict and type(message.get("return")) is PreEncoded:
        rest = {k: v for k, v in message.items() if k != "return"}
        text = '{"return": ' + cast(PreEncoded, message["return"])
        if rest:
            text += ", " + encode_text(rest)[1:-1]
        return (text + "}").encode("ascii") + b"\r\n"
    return encode_text(message).encode("ascii") + b"\r\n"


def encode_text(message: Any, *, floats: bool = True) -> str:
    """The JSON text QEMU would write for ``message`` (no line end).

    ``floats=False`` promises that ``message`` holds no float, which skips the scan that
    rewrites them in QEMU's notation (for large integer-only results). A
    :class:`PreEncoded` message is that text already.
    """
    if type(message) is PreEncoded:
        return str(message)
    message = qemu_ordered(message)
    try:
        text = _encode_fast(message)
    except RecursionError:
        text = _encode_deep(message)
    except ValueError:
        text = _NAN_OR_STRING.sub(_c_nan, _nan_encoder.encode(message))
    # Substring tests first: a float's repr always holds "." or an exponent ("1e+300"),
    # and they cost a tenth of the regex search on the common float-free reply.
    if floats and ("." in text or "e+" in text or "e-" in text) and _MAYBE_FLOAT.search(text) is not None:
        text = _FLOAT_OR_STRING.sub(_qemu_float, text)
    if "\\u" in text:
        text = _ESCAPE.sub(_upper, text)
    if "\x7f" in text:
        # DEL is outside what QEMU passes through unescaped; json leaves it raw.
        text = text.replace("\x7f", "\\u007F")
    return text


# ------------------------------------------------------------------- pretty printing

#: A compact output's tokens: a string, a bracket, the ", " between members or elements,
#: or a run of anything else (numbers, literals, ": ", the line end).
_PRETTY_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]]|, |[^"{}\[\],]+')


def prettify(data: bytes) -> bytes:
    """Compact output (one or more lines of :func:`encode`) as a ``pretty=on`` monitor
    writes it: QEMU's qobject_to_json_pretty puts each member and element on a line of its
    own, indented four spaces a level, the closing bracket on a line of its own (an
    empty object too: ``{``, then ``}`` on the next line), and the monitor turns every
    newline into CRLF. The tokens themselves are left as they are (same numbers and
    escapes as the compact form)."""
    out: list[str] = []
    depth = 0
    just_opened = False
    for token in _PRETTY_TOKEN.findall(data.decode("ascii")):
        first = token[0]
        if first in "{[":
            depth += 1
            out.append(token)
            out.append("\r\n" + "    " * depth)
            just_opened = True
            continue
        if first in "}]":
            depth -= 1
            if just_opened:
                out.pop()
            out.append("\r\n" + "    " * depth)
            out.append(token)
        elif token == ", ":
            out.append(",\r\n" + "    " * depth)
        else:
            out.append(token)
        just_opened = False
    return "".join(out).encode("ascii")
