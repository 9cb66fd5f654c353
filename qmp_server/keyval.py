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
from .protocol.framing import JSONParseError, JSONStreamer
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


def parse_json_option(text: str) -> Any:
    """Parse an option argument as QEMU's ``qobject_from_json`` does, with its error texts.

    The same JSON stream parser as the monitor's (single-quoted strings included), fed the
    argument's bytes and flushed; exactly one JSON value is allowed (consume_json: the
    first outcome counts, any further value is an error).
    """
    streamer = JSONStreamer()
    outcomes = streamer.feed(text.encode("utf-8", "surrogateescape")) + streamer.flush()
    if not outcomes:
        raise QMPError("Expecting a JSON value")
    first = outcomes[0]
    if isinstance(first, JSONParseError):
        raise QMPError(first.desc)
    if len(outcomes) > 1:
        raise QMPError("Expecting at most one JSON value")
    return first


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
