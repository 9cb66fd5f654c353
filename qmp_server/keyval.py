"""QEMU's command-line option syntax for ``-blockdev`` (util/keyval.c), with QEMU's errors.

``key=value,key2.sub=value2`` describes a JSON object whose leaves are all strings:

* ``,,`` inside a value stands for one comma; a single comma ends the value;
* dotted keys build nested objects; purely numeric key fragments (not the first one) build
  lists, whose indices must run from 0 without gaps;
* with an implied key, the first element may be a bare value (``qcow2,file=...`` means
  ``driver=qcow2,...``); such a value ends at the first ``,`` or ``=`` and has no escapes;
* ``help`` or ``?`` as an element asks for help, which ``-blockdev`` does not offer.

Where QEMU's result depends on the iteration order of its QDict (which list is reported
missing first, which of two keys denoting the same list index wins), we iterate in the same
order, which follows QEMU's hash function.

:func:`blockdev_options_from_cli` turns a whole ``-blockdev`` argument into blockdev-add
arguments: JSON when it starts with ``{``, else keyval with the strings converted to the
types the schema wants.
"""

from __future__ import annotations

import re
from typing import Any, Final

from .errors import QMPError
from .protocol.qdict import qdict_order
from .schema import Schema

_INT_MAX: Final = 2**31 - 1
_KEY_FRAGMENT_MAX: Final = 127
_NAME_RE = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")
_DIGITS_RE = re.compile(r"[0-9]+")


def _name_length(text: str, start: int) -> int:
    """Length of the QAPI name at ``start`` (QEMU's ``parse_qapi_name``), 0 if none."""
    match = _NAME_RE.match(text, start)
    return match.end() - start if match else 0


def _index_of(fragment: str) -> int:
    """A list index for an all-digits key (capped at INT_MAX like QEMU), else -1."""
    if not fragment or not fragment.isdigit() or not fragment.isascii():
        return -1
    return min(int(fragment), _INT_MAX)


def _put(cur: dict[str, Any], key: str, value: str | None, whole_key: str, cursor: int) -> Any:
    """Make ``cur[key]`` a dict (value None) or the string ``value``, as ``keyval_parse_put``."""
    old = cur.get(key)
    if old is not None:
        if (value is None) != isinstance(old, dict):
            raise QMPError(f"Parameters '{whole_key[:cursor]}.*' used inconsistently")
        if value is None:
            return old
    new: Any = {} if value is None else value
    # Replacing keeps the key's place, as replacing a QDict entry does.
    cur[key] = new
    return new


def _parse_one(root: dict[str, Any], text: str, start: int, implied_key: str | None) -> tuple[int, bool]:
    """Parse the element at ``start``; return where the next one starts and whether it was help."""
    end = start
    while end < len(text) and text[end] not in "=,":
        end += 1
    length = end - start
    value_end: int | None = None
    key = text[start:end]
    if length and (end == len(text) or text[end] != "="):
        if key in ("help", "?"):
            return (end + 1 if end < len(text) else end), True
        if implied_key:
            value_end = end
            key = implied_key

    cur = root
    pos = 0
    previous = ""
    while True:
        digits = _DIGITS_RE.match(key, pos) if pos else None
        size = digits.end() - pos if digits else _name_length(key, pos)
        if not size or (pos + size < len(key) and key[pos + size] != "."):
            raise QMPError(f"Invalid parameter '{key}'")
        if size > _KEY_FRAGMENT_MAX:
            fragment = " fragment" if pos or pos + size != len(key) else ""
            raise QMPError(f"Parameter{fragment} '{key[pos : pos + size]}' is too long")
        if pos:
            cur = _put(cur, previous, None, key, pos - 1)
        previous = key[pos : pos + size]
        pos += size
        if pos >= len(key) or key[pos] != ".":
            break
        pos += 1

    if value_end is not None:
        value = text[start:value_end]
        following = value_end + 1 if value_end < len(text) else value_end
    else:
        position = start + pos
        if position >= len(text) or text[position] != "=":
            raise QMPError(f"Expected '=' after parameter '{key[:pos]}'")
        chars: list[str] = []
        i = position + 1
        while i < len(text):
            if text[i] == ",":
                i += 1
                if i >= len(text) or text[i] != ",":
                    break
            chars.append(text[i])
            i += 1
        value = "".join(chars)
        following = i
    _put(cur, previous, value, key, len(key))
    return following, False


def _listify(cur: dict[str, Any], key_of_cur: list[str]) -> dict[str, Any] | list[Any]:
    """Replace dicts whose keys are all list indices by lists (``keyval_listify``)."""
    has_index = has_member = False
    order = qdict_order(list(cur))
    for key in order:
        if _index_of(key) >= 0:
            has_index = True
        else:
            has_member = True
        value = cur[key]
        if isinstance(value, dict):
            cur[key] = _listify(value, [*key_of_cur, key])
    prefix = "".join(fragment + "." for fragment in key_of_cur)
    if has_index and has_member:
        raise QMPError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return cur
    slots = len(cur) + 1  # one more than needed, as QEMU's sentinel
    elements: list[Any] = [None] * slots
    max_index = -1
    for key in order:
        index = _index_of(key)
        max_index = max(max_index, index)
        if index < slots - 1:
            elements[index] = cur[key]
    count = min(slots, max_index + 1)
    for index in range(count):
        if elements[index] is None:
            raise QMPError(f"Parameter '{prefix}{index}' missing")
    return elements[:count]


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse QEMU's ``key=value,...`` syntax into nested dicts (and lists) of strings.

    Raises :class:`QMPError` with QEMU's message on malformed input.
    """
    root: dict[str, Any] = {}
    position = 0
    wants_help = False
    key = implied_key
    while position < len(text):
        position, is_help = _parse_one(root, text, position, key)
        wants_help = wants_help or is_help
        key = None
    if wants_help:
        raise QMPError("Help is not available for this option")
    result = _listify(root, [])
    assert isinstance(result, dict)
    return result


# ----------------------------------------------------------------------------- JSON


class _JSONError(Exception):
    pass


_STRAY: Final = object()
_MAX_NESTING: Final = 1024
_WS: Final = " \t\r\n"


def _lex(text: str) -> list[tuple[str, str]]:
    """QEMU's JSON lexer (qobject/json-lexer.c): tokens as (kind, text); errors as ('error', text)."""
    tokens: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in _WS:
            i += 1
        elif c in "{}[]:,":
            tokens.append((c, c))
            i += 1
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                if ord(text[j]) < 0x20:
                    tokens.append(("error", text[i : j + 1]))
                    return tokens
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                tokens.append(("error", text[i:]))
                return tokens
            tokens.append(("string", text[i : j + 1]))
            i = j + 1
        elif "a" <= c <= "z":
            j = i
            while j < n and "a" <= text[j] <= "z":
                j += 1
            tokens.append(("keyword", text[i:j]))
            i = j
        elif c == "-" or (c.isdigit() and c.isascii()):
            token, i = _lex_number(text, i)
            tokens.append(token)
            if token[0] == "error":
                return tokens
        else:
            tokens.append(("error", c))
            return tokens
    return tokens


def _lex_number(text: str, i: int) -> tuple[tuple[str, str], int]:
    n = len(text)
    j = i
    if text[j] == "-":
        j += 1
    if j >= n or not ("0" <= text[j] <= "9"):
        return ("error", text[i : j + 1]), j + 1
    if text[j] == "0":
        j += 1
        if j < n and "0" <= text[j] <= "9":
            return ("error", text[i : j + 1]), j + 1
    else:
        while j < n and "0" <= text[j] <= "9":
            j += 1
    kind = "integer"
    if j < n and text[j] == ".":
        j += 1
        if j >= n or not ("0" <= text[j] <= "9"):
            return ("error", text[i : j + 1]), j + 1
        while j < n and "0" <= text[j] <= "9":
            j += 1
        kind = "float"
    if j < n and text[j] in "eE":
        j += 1
        if j < n and text[j] in "+-":
            j += 1
        if j >= n or not ("0" <= text[j] <= "9"):
            return ("error", text[i : j + 1]), j + 1
        while j < n and "0" <= text[j] <= "9":
            j += 1
        kind = "float"
    return (kind, text[i:j]), j


_ESCAPES: Final = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


def _string_value(token: str) -> str:
    out: list[str] = []
    body = token[1:-1]
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            if 0xDC80 <= ord(c) <= 0xDCFF:  # undecodable byte from the command line
                raise _JSONError("invalid UTF-8 sequence in string")
            out.append(c)
            i += 1
            continue
        escape = body[i + 1] if i + 1 < len(body) else ""
        if escape in _ESCAPES:
            out.append(_ESCAPES[escape])
            i += 2
            continue
        if escape != "u":
            raise _JSONError("invalid escape sequence in string")
        start = i
        code, i = _hex4(body, i + 2)
        if 0xD800 <= code <= 0xDBFF and body[i : i + 2] == "\\u":
            low, after = _hex4(body, i + 2)
            if 0xDC00 <= low <= 0xDFFF:
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                i = after
        if 0xD800 <= code <= 0xDFFF:
            raise _JSONError(f"{body[start:i]} is not a valid Unicode character")
        out.append(chr(code))
    return "".join(out)


def _hex4(body: str, i: int) -> tuple[int, int]:
    digits = body[i : i + 4]
    if len(digits) < 4 or any(d not in "0123456789abcdefABCDEF" for d in digits):
        raise _JSONError("invalid hex escape sequence in string")
    return int(digits, 16), i + 4


class _Parser:
    """QEMU's recursive-descent JSON parser (qobject/json-parser.c) over one message's tokens."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _pop(self) -> tuple[str, str] | None:
        if self.pos >= len(self.tokens):
            return None
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def value(self) -> Any:
        token = self._pop()
        if token is None:
            raise _JSONError("premature EOI")
        kind, text = token
        if kind == "{":
            return self._object()
        if kind == "[":
            return self._array()
        if kind == "string":
            return _string_value(text)
        if kind == "integer":
            number = int(text)
            # Beyond uint64 QEMU falls back to a double.
            return number if -(2**63) <= number <= 2**64 - 1 else float(text)
        if kind == "float":
            return float(text)
        if kind == "keyword":
            if text in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[text]
            raise _JSONError(f"invalid keyword '{text}'")
        raise _JSONError("expecting value")

    def _object(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        token = self._peek()
        if token is None:
            raise _JSONError("premature EOI")
        if token[0] == "}":
            self._pop()
            return result
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise _JSONError("key is not a string in object")
            colon = self._pop()
            if colon is None:
                raise _JSONError("premature EOI")
            if colon[0] != ":":
                raise _JSONError("missing : in object pair")
            item = self.value()
            if key in result:
                raise _JSONError("duplicate key")
            result[key] = item
            token = self._pop()
            if token is None:
                raise _JSONError("premature EOI")
            if token[0] == "}":
                return result
            if token[0] != ",":
                raise _JSONError("expected separator in dict")

    def _array(self) -> list[Any]:
        result: list[Any] = []
        token = self._peek()
        if token is None:
            raise _JSONError("premature EOI")
        if token[0] == "]":
            self._pop()
            return result
        while True:
            result.append(self.value())
            token = self._pop()
            if token is None:
                raise _JSONError("premature EOI")
            if token[0] == "]":
                return result
            if token[0] != ",":
                raise _JSONError("expected separator in list")


def parse_json_option(text: str) -> Any:
    """Parse an option argument as QEMU's ``qobject_from_json`` does, with its error texts.

    QEMU's parser also takes single-quoted strings. Exactly one JSON value is allowed.
    """
    result: Any = _STRAY
    error: str | None = None

    def emit(value: Any, problem: str | None) -> None:
        # Like QEMU's consume_json(): the first outcome counts, anything after a value is an error.
        nonlocal result, error
        if error is not None:
            return
        if result is not _STRAY:
            error = "Expecting at most one JSON value"
            return
        result, error = value, problem

    def parse(batch: list[tuple[str, str]]) -> None:
        try:
            emit(_Parser(batch).value(), None)
        except _JSONError as problem:
            emit(None, f"JSON parse error, {problem}")

    # The streamer (qobject/json-streamer.c) cuts the token stream into messages.
    braces = brackets = 0
    message: list[tuple[str, str]] = []
    for kind, token_text in _lex(text):
        if kind == "error":
            emit(None, f"JSON parse error, stray '{token_text}'")
            break
        braces += {"{": 1, "}": -1}.get(kind, 0)
        brackets += {"[": 1, "]": -1}.get(kind, 0)
        if braces + brackets > _MAX_NESTING:
            emit(None, "JSON nesting depth limit exceeded")
            message, braces, brackets = [], 0, 0
            continue
        message.append((kind, token_text))
        if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
            continue
        parse(message)
        message, braces, brackets = [], 0, 0
    else:
        if message:
            parse(message)
    if error is not None:
        raise QMPError(error)
    return result


# ----------------------------------------------------------------------------- -blockdev


def blockdev_options_from_cli(schema: Schema, text: str) -> dict[str, Any]:
    """The blockdev-add arguments a ``-blockdev`` option argument stands for.

    JSON when ``text`` starts with ``{`` (checked like blockdev-add arguments), else keyval
    with ``driver`` as the implied key and each string converted to the type the schema
    wants (booleans from on/yes/true/y and off/no/false/n, integers in C syntax with 0x and
    0 prefixes). Raises :class:`QMPError` with the message QEMU prints after
    ``-blockdev TEXT:``.
    """
    if text.startswith("{"):
        arguments = parse_json_option(text)
        if not isinstance(arguments, dict):
            raise QMPError("Invalid parameter type for '<anonymous>', expected: object")
        schema.validate_arguments("blockdev-add", arguments)
        return arguments
    return schema.keyval_arguments("blockdev-add", parse_keyval(text, "driver"))
