"""QEMU's QDict member order: the one copy of it.

QEMU keeps JSON objects in QDicts, hash tables of 512 buckets, and every walk over one
(``qdict_first``/``qdict_next``) visits the buckets in order, newest entry first within a
bucket. That order is observable: it decides which fault of a request with several is
reported (QEMU checks the members in it), which ``-blockdev`` key is named first, and
the order of the members of an ``id`` QEMU echoes (``{"b": 1, "a": 2}`` comes back as
``{"a": 2, "b": 1}``).

The hash (``tdb_hash``) runs over the key's bytes as QEMU holds them, which are not
always Python's UTF-8 for the key:

* U+0000 is held as ``C0 80`` (QEMU's JSON parser stores ``\\u0000`` and the raw bytes
  ``C0 80`` both that way, modified UTF-8), never as a NUL byte;
* a key that came from the command line holds whatever bytes ``argv`` had; Python
  decodes those with ``surrogateescape``, so encoding with it gets them back. (Keys from
  QMP input never hold lone surrogates: the parser rejects them.)
"""

from __future__ import annotations

from typing import Any, Final

BUCKETS: Final = 512


def key_bytes(key: str) -> bytes:
    """The bytes QEMU holds for the string ``key`` (see the module's text)."""
    data = key.encode("utf-8", "surrogateescape")
    return data.replace(b"\0", b"\xc0\x80") if b"\0" in data else data


def tdb_hash(key: str) -> int:
    """QEMU's ``tdb_hash`` (qobject/qdict.c) of ``key``."""
    data = key_bytes(key)
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for index, byte in enumerate(data):
        value = (value + (byte << (index * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


# Requests of one client repeat the same few key sets ("execute", "arguments", "id").
_ORDER_CACHE: dict[tuple[str, ...], list[str]] = {}
_ORDER_CACHE_MAX: Final = 4096


def qdict_order(keys: list[str]) -> list[str]:
    """``keys`` (in insertion order) in the order QEMU iterates a QDict holding them."""
    signature = tuple(keys)
    order = _ORDER_CACHE.get(signature)
    if order is None:
        indexed = [(tdb_hash(key) % BUCKETS, -position, key) for position, key in enumerate(keys)]
        indexed.sort()
        order = [key for _, _, key in indexed]
        if len(_ORDER_CACHE) >= _ORDER_CACHE_MAX:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[signature] = order
    return list(order)


def qemu_ordered(value: Any) -> Any:
    """A copy of ``value`` with every object's members in the order QEMU writes them.

    Iterative, because input may nest up to 1024 deep.
    """
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        source, parent, slot = stack.pop()
        if isinstance(source, dict):
            keys = qdict_order(list(source)) if len(source) > 1 else list(source)
            copy: dict[str, Any] = dict.fromkeys(keys)
            parent[slot] = copy
            for key in keys:
                item = source[key]
                if isinstance(item, dict | list):
                    stack.append((item, copy, key))
                else:
                    copy[key] = item
        else:
            items = list(source)
            parent[slot] = items
            for index, item in enumerate(items):
                if isinstance(item, dict | list):
                    stack.append((item, items, index))
    return root[0]
