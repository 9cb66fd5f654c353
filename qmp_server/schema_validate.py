"""QEMU's argument checking, compiled from the JSON Schema in ``schema/``.

QEMU does not validate arguments against a schema in one go: its generated visitors walk the
C type member by member (``qapi/qobject-input-visitor.c``) and report the first problem they
meet. To give the same error for every input we compile each schema into a tree of nodes that
walk a value in the same order and fail with the same texts:

* members of a struct in declaration order; a union's common members (including the
  discriminator), then the members of the selected variant; unexpected members only after all
  declared members were visited;
* missing and unexpected members, wrong JSON types (except for alternates) and uint64 values
  are named by their full path (``file.filename``, ``capabilities[0].state``);
* bad enum values, sized integers out of range and alternates of the wrong type are named by
  the bare member name, or ``null`` inside a list (QEMU formats these with ``name ?: "null"``).

The same nodes also convert the all-string trees of the keyval (``-blockdev key=val``) syntax
into typed values, with the keyval visitor's texts (``expects integer``, ``'on' or 'off'``).

Valid input raises nothing and builds no paths: a failing node raises :class:`Failure` and each
container it passes on the way up records its member name or list index. The one change a
check makes to valid input: a negative number in a 'uint64'/'size' member is stored back as the
uint64 it wraps to, as QEMU's visitor casts it, so later range checks see QEMU's number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final
from urllib.parse import urldefrag, urljoin

from .protocol.qdict import key_bytes, qdict_order

I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1
U64_MAX: Final = 2**64 - 1

# Failure kinds; each maps to one QEMU message template (see Failure.message).
MISSING: Final = "missing"
UNEXPECTED: Final = "unexpected"
TYPE: Final = "type"
TYPE_BARE: Final = "type-bare"
EXPECTS: Final = "expects"
EXPECTS_BARE: Final = "expects-bare"
ENUM: Final = "enum"
KEYVAL_NESTED: Final = "keyval-nested"


class SchemaError(Exception):
    """The schema files use a construct the compiler does not understand."""


class Failure(Exception):
    """A value failed a check. ``path`` is filled innermost first while the error travels up."""

    __slots__ = ("detail", "kind", "path")

    def __init__(self, kind: str, detail: str = "", path: list[str | int] | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail
        self.path: list[str | int] = [] if path is None else path

    def message(self, keyval: bool = False) -> str:
        """QEMU's text for this failure (keyval=True names list elements ``a.0`` not ``a[0]``)."""
        path = self.path[::-1]
        full = full_name(path, keyval)
        bare = path[-1] if path and isinstance(path[-1], str) else "null"
        kind = self.kind
        if kind == MISSING:
            return f"Parameter '{full}' is missing"
        if kind == UNEXPECTED:
            return f"Parameter '{full}' is unexpected"
        if kind == TYPE:
            return f"Invalid parameter type for '{full}', expected: {self.detail}"
        if kind == TYPE_BARE:
            return f"Invalid parameter type for '{bare}', expected: {self.detail}"
        if kind == EXPECTS:
            return f"Parameter '{full}' expects {self.detail}"
        if kind == EXPECTS_BARE:
            return f"Parameter '{bare}' expects {self.detail}"
        if kind == ENUM:
            return f"Parameter '{bare}' does not accept value '{self.detail}'"
        if kind == KEYVAL_NESTED:
            return f"Parameters '{full}.*' are unexpected"
        raise AssertionError(kind)


def full_name(path: list[str | int], keyval: bool = False) -> str:
    """QEMU's dotted/indexed name of a member (``full_name_nth`` in the input visitor)."""
    if not path:
        return "<anonymous>"
    parts: list[str] = []
    for component in path:
        if isinstance(component, int):
            parts.append(f".{component}" if keyval else f"[{component}]")
        elif parts:
            parts.append("." + component)
        else:
            parts.append(component)
    return "".join(parts)


def qtype(value: Any) -> str:
    """The QObject type QEMU's JSON parser would produce for a decoded JSON value."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "num"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list):
        return "list"
    if value is None:
        return "null"
    return "other"


# ----------------------------------------------------------------------------- QEMU's orders

# GLib's prime_mod[]: for a table of 2^n slots, the largest prime below 2^n.
_PRIME_MOD: Final = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
)  # fmt: skip


def _g_str_hash(key: str) -> int:
    """GLib's ``g_str_hash`` (djb2 over *signed* chars)."""
    value = 5381
    for byte in key_bytes(key):
        value = (value * 33 + (byte - 256 if byte >= 128 else byte)) & 0xFFFFFFFF
    return value if value > 1 else 2


class _GHashTable:
    """Just enough of GLib's open-addressing GHashTable to know its iteration order.

    QEMU's input visitor puts the keys of each JSON object into a GHashTable, removes each
    key it visits, and names the first key left in table order as unexpected.
    """

    def __init__(self) -> None:
        self._set_shift(3)
        self.hashes = [0] * self.size  # 0: unused, 1: tombstone
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, hash_value: int) -> int:
        return ((hash_value * 11) & 0xFFFFFFFF) % self.mod

    def _lookup(self, key: str) -> tuple[int, int]:
        hash_value = _g_str_hash(key)
        index = self._index(hash_value)
        step = 0
        tombstone: int | None = None
        while self.hashes[index]:
            if self.hashes[index] == hash_value and self.keys[index] == key:
                return index, hash_value
            if self.hashes[index] == 1 and tombstone is None:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (index if tombstone is None else tombstone), hash_value

    def insert(self, key: str) -> None:
        """``g_hash_table_insert`` of a new key."""
        index, hash_value = self._lookup(key)
        old = self.hashes[index]
        if old > 1:
            return
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if old == 0:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        """``g_hash_table_remove``."""
        index, _ = self._lookup(key)
        if self.hashes[index] <= 1:
            return
        self.hashes[index] = 1
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def first(self) -> str | None:
        """The key ``g_hash_table_iter_next`` yields first."""
        for hash_value, key in zip(self.hashes, self.keys, strict=True):
            if hash_value > 1:
                return key
        return None

    def _maybe_resize(self) -> None:
        too_sparse = self.size > self.nnodes * 4 and self.size > 8
        too_full = self.size <= self.noccupied + self.noccupied // 16
        if too_sparse or too_full:
            self._resize()

    def _resize(self) -> None:
        # In-place rehash, evicting entries along the way, exactly as GLib does it: the
        # resulting slots (and so the iteration order) depend on this eviction order.
        old_size = self.size
        wanted = int(self.nnodes * 1.333)
        shift = 0
        while wanted:
            wanted >>= 1
            shift += 1
        self._set_shift(max(shift, 3))
        if self.size > old_size:
            self.hashes.extend([0] * (self.size - old_size))
            self.keys.extend([None] * (self.size - old_size))
        placed = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash <= 1:
                self.hashes[i] = 0
                continue
            if placed[i]:
                continue
            self.hashes[i] = 0
            key = self.keys[i]
            self.keys[i] = None
            while True:
                index = self._index(node_hash)
                step = 0
                while placed[index]:
                    step += 1
                    index = (index + step) & self.mask
                placed[index] = True
                replaced = self.hashes[index]
                self.hashes[index] = node_hash
                if replaced <= 1:
                    self.keys[index] = key
                    break
                node_hash = replaced
                key, self.keys[index] = self.keys[index], key
        if self.size < old_size:
            del self.hashes[self.size :]
            del self.keys[self.size :]
        self.noccupied = self.nnodes


def qemu_unexpected_key(keys: list[str], visited: list[str]) -> str | None:
    """The member QEMU reports as unexpected.

    ``keys`` are the object's keys in input order, ``visited`` the declared members present in
    it, in the order the visitor consumed them. None if nothing is left over.
    """
    table = _GHashTable()
    for key in qdict_order(keys):
        table.insert(key)
    for key in visited:
        table.remove(key)
    return table.first()


# ----------------------------------------------------------------------------- nodes


class Node:
    """One QAPI type: checks JSON input and converts keyval input."""

    __slots__ = ("features", "name")
    #: Name of the QAPI built-in type this node stands for ('str', 'int', ...), if any.
    builtin: ClassVar[str | None] = None
    #: JSON type name QEMU's introspection reports for the built-in.
    json_type: ClassVar[str] = "value"

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.features: tuple[str, ...] = ()

    def check(self, value: Any) -> None:
        """Raise :class:`Failure` if ``value`` is not acceptable JSON input."""
        raise NotImplementedError

    def keyval(self, value: Any) -> Any:
        """Convert keyval input (strings, dicts and lists of them) to typed values."""
        raise NotImplementedError


def _keyval_string(value: Any) -> str:
    """The string a scalar takes in keyval input, or the keyval visitor's failure."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        raise Failure(KEYVAL_NESTED)
    raise Failure(TYPE, "string")


class AnyNode(Node):
    """QAPI 'any'."""

    __slots__ = ()
    builtin = "any"
    json_type = "value"

    def check(self, value: Any) -> None:
        pass

    def keyval(self, value: Any) -> Any:
        return value


class StrNode(Node):
    """QAPI 'str'."""

    __slots__ = ()
    builtin = "str"
    json_type = "string"

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise Failure(TYPE, "string")

    def keyval(self, value: Any) -> Any:
        return _keyval_string(value)


class BoolNode(Node):
    """QAPI 'bool'."""

    __slots__ = ()
    builtin = "bool"
    json_type = "boolean"
    _TRUE: ClassVar[frozenset[str]] = frozenset(("on", "yes", "true", "y"))
    _FALSE: ClassVar[frozenset[str]] = frozenset(("off", "no", "false", "n"))

    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise Failure(TYPE, "boolean")

    def keyval(self, value: Any) -> Any:
        text = _keyval_string(value)
        # qapi_bool_parse(): exact, case-sensitive words.
        if text in self._TRUE:
            return True
        if text in self._FALSE:
            return False
        raise Failure(EXPECTS, "'on' or 'off'")


class NullNode(Node):
    """QAPI 'null'."""

    __slots__ = ()
    builtin = "null"
    json_type = "null"

    def check(self, value: Any) -> None:
        if value is not None:
            raise Failure(TYPE, "null")

    def keyval(self, value: Any) -> Any:
        # The keyval syntax has no way to write null.
        raise Failure(TYPE, "null")


_FLOAT_RE = re.compile(
    r"[ \t\n\v\f\r]*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
    r"|0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?\d+)?)"
)


class NumberNode(Node):
    """QAPI 'number' (a double; integers are accepted too)."""

    __slots__ = ()
    builtin = "number"
    json_type = "number"

    def check(self, value: Any) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise Failure(TYPE, "number")

    def keyval(self, value: Any) -> Any:
        text = _keyval_string(value)
        # qemu_strtod_finite(): strtod syntax, no trailing garbage, no inf/nan.
        if not _FLOAT_RE.fullmatch(text):
            raise Failure(TYPE, "number")
        stripped = text.lstrip(" \t\n\v\f\r")
        body = stripped.lstrip("+-")
        number = float.fromhex(stripped) if body[:2] in ("0x", "0X") else float(stripped)
        if number in (float("inf"), float("-inf")):
            raise Failure(TYPE, "number")
        return number


_INT_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def strtoll(text: str, unsigned: bool = False) -> int | None:
    """C ``strtoll``/``strtoull`` with base 0 and no trailing garbage; None on failure.

    As in C, the unsigned flavour accepts a minus sign and wraps the result modulo 2^64.
    """
    match = _INT_RE.fullmatch(text)
    if match is None:
        return None
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X"):
        magnitude = int(digits[2:], 16)
    elif digits.startswith("0"):
        magnitude = int(digits, 8)
    else:
        magnitude = int(digits)
    if unsigned:
        if magnitude > U64_MAX:
            return None
        return (-magnitude) % 2**64 if sign == "-" else magnitude
    value = -magnitude if sign == "-" else magnitude
    if not I64_MIN <= value <= I64_MAX:
        return None
    return value


class IntNode(Node):
    """QAPI 'int', 'int64' and the range-checked 'int8', 'int16', 'int32'."""

    __slots__ = ("ctype", "hi", "lo")
    json_type = "int"
    builtin = "int"

    def __init__(self, lo: int, hi: int, ctype: str | None) -> None:
        super().__init__()
        self.lo = lo
        self.hi = hi
        self.ctype = ctype

    def check(self, value: Any) -> None:
        # JSON integers beyond int64 become uint64 or double in QEMU: not an "integer" here.
        if isinstance(value, bool) or not isinstance(value, int) or not I64_MIN <= value <= I64_MAX:
            raise Failure(TYPE, "integer")
        if self.ctype is not None and not self.lo <= value <= self.hi:
            raise Failure(EXPECTS_BARE, self.ctype)

    def keyval(self, value: Any) -> Any:
        number = strtoll(_keyval_string(value))
        if number is None:
            raise Failure(EXPECTS, "integer")
        if self.ctype is not None and not self.lo <= number <= self.hi:
            raise Failure(EXPECTS_BARE, self.ctype)
        return number


_SIZE_SUFFIX: Final = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE_RE = re.compile(r"[ \t\n\v\f\r]*\+?(\d+)(\.\d*)?([bBkKmMgGtTpPeE]?)")
_SIZE_HEX_RE = re.compile(r"[ \t\n\v\f\r]*\+?0[xX]([0-9a-fA-F]+)")


def strtosz(text: str) -> int | None:
    """QEMU's ``qemu_strtosz``: a byte count with an optional binary suffix; None on failure."""
    hex_match = _SIZE_HEX_RE.fullmatch(text)
    if hex_match is not None:
        value = int(hex_match.group(1), 16)
        return value if value <= U64_MAX else None
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        return None
    whole, fraction, suffix = match.groups()
    exponent = _SIZE_SUFFIX[suffix.lower()] if suffix else 0
    # The number is numerator / denominator exactly (integers: no float rounding, and no
    # fractions module to import at start-up).
    digits = fraction[1:] if fraction else ""
    denominator = 10 ** len(digits)
    numerator = int(whole) * denominator + (int(digits) if digits else 0)
    if numerator % denominator and exponent == 0:
        return None  # a fraction needs a unit to scale it
    scaled = numerator * 1024**exponent
    value = (2 * scaled + denominator) // (2 * denominator)  # round half up, as QEMU does
    return value if value <= U64_MAX else None


class UIntNode(Node):
    """QAPI 'uint64', 'size' and the range-checked 'uint8', 'uint16', 'uint32'."""

    __slots__ = ("ctype", "hi", "is_size")
    json_type = "int"
    builtin = "int"

    def __init__(self, hi: int, ctype: str | None, is_size: bool = False) -> None:
        super().__init__()
        self.hi = hi
        self.ctype = ctype
        self.is_size = is_size

    def check(self, value: Any) -> None:
        # QEMU takes negative int64 values "for backward compatibility"; they wrap around.
        if not isinstance(value, int) or isinstance(value, bool) or not I64_MIN <= value <= U64_MAX:
            raise Failure(EXPECTS, "uint64")
        if self.ctype is not None and value % 2**64 > self.hi:
            raise Failure(EXPECTS_BARE, self.ctype)

    @staticmethod
    def wrap(value: int) -> int:
        """The uint64 a checked value stands for: QEMU casts a negative int64 (so -1 is 2^64-1).

        Containers store this back, so handlers and range checks after the visit
        (``migrate_params_check``, driver options) see the number QEMU sees.
        """
        return value + 2**64 if value < 0 else value

    def keyval(self, value: Any) -> Any:
        text = _keyval_string(value)
        if self.is_size:
            number = strtosz(text)
            if number is None:
                raise Failure(EXPECTS, "size")
        else:
            number = strtoll(text, unsigned=True)
            if number is None:
                raise Failure(EXPECTS, "integer")
        if self.ctype is not None and number > self.hi:
            raise Failure(EXPECTS_BARE, self.ctype)
        return number


class EnumNode(Node):
    """A QAPI enum: a string from a fixed set."""

    __slots__ = ("value_features", "value_set", "values")

    def __init__(self, values: list[str], name: str | None = None) -> None:
        super().__init__(name)
        self.values = tuple(values)
        self.value_set = frozenset(values)
        self.value_features: dict[str, tuple[str, ...]] = {}

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise Failure(TYPE, "string")
        if value not in self.value_set:
            raise Failure(ENUM, value)

    def keyval(self, value: Any) -> Any:
        self.check(_keyval_string(value))
        return value


class ListNode(Node):
    """A QAPI array."""

    __slots__ = ("element",)

    def __init__(self, element: Node) -> None:
        super().__init__()
        self.element = element

    def check(self, value: Any) -> None:
        if not isinstance(value, list):
            raise Failure(TYPE, "array")
        check = self.element.check
        for index, item in enumerate(value):
            try:
                check(item)
            except Failure as failure:
                failure.path.append(index)
                raise
        if isinstance(self.element, UIntNode):
            value[:] = [UIntNode.wrap(item) for item in value]

    def keyval(self, value: Any) -> Any:
        if not isinstance(value, list):
            raise Failure(TYPE, "array")
        out = []
        for index, item in enumerate(value):
            try:
                out.append(self.element.keyval(item))
            except Failure as failure:
                failure.path.append(index)
                raise
        return out


class Member:
    """One member of a struct or union."""

    __slots__ = ("features", "name", "node", "required")

    def __init__(self, name: str, node: Node, required: bool, features: tuple[str, ...]) -> None:
        self.name = name
        self.node = node
        self.required = required
        self.features = features


# (member name, check, required, whether the checked value is wrapped to uint64)
_Plan = tuple[tuple[str, Callable[[Any], None], bool, bool], ...]


class StructNode(Node):
    """A QAPI struct, or a flat union (common members + one variant chosen by a discriminator)."""

    __slots__ = ("_plan", "_variant_plans", "discriminator", "members", "open", "variants")

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.members: tuple[Member, ...] = ()
        self.discriminator: str | None = None
        #: Variant members by discriminator value (values without an entry add no members).
        self.variants: dict[str, tuple[Member, ...]] = {}
        self._plan: _Plan = ()
        self._variant_plans: dict[str, _Plan] = {}
        #: Other members are let through (QEMU's 'gen': false commands such as device_add,
        #: whose handler reads what it needs from the dictionary itself).
        self.open = False

    def finish(self) -> None:
        """Precompute the walk once all member nodes exist."""
        self._plan = self._make_plan(self.members)
        self._variant_plans = {case: self._make_plan(members) for case, members in self.variants.items()}

    @staticmethod
    def _make_plan(members: tuple[Member, ...]) -> _Plan:
        return tuple((m.name, m.node.check, m.required, isinstance(m.node, UIntNode)) for m in members)

    @staticmethod
    def _walk(plan: _Plan, value: dict[str, Any]) -> int:
        present = 0
        for name, check, required, wraps in plan:
            if name in value:
                present += 1
                try:
                    check(value[name])
                except Failure as failure:
                    failure.path.append(name)
                    raise
                if wraps and value[name] < 0:
                    value[name] = UIntNode.wrap(value[name])
            elif required:
                raise Failure(MISSING, path=[name])
        return present

    def _case(self, value: dict[str, Any]) -> str | None:
        """The selected variant; the discriminator was already checked as a common member."""
        if self.discriminator is None:
            return None
        case: str = value[self.discriminator]
        return case if case in self.variants else None

    def _unexpected(self, value: dict[str, Any], case: str | None) -> Failure:
        visited = [m.name for m in self.members if m.name in value]
        if case is not None:
            visited += [m.name for m in self.variants[case] if m.name in value]
        key = qemu_unexpected_key(list(value), visited)
        assert key is not None
        return Failure(UNEXPECTED, path=[key])

    def check(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise Failure(TYPE, "object")
        present = self._walk(self._plan, value)
        case = self._case(value)
        if case is not None:
            present += self._walk(self._variant_plans[case], value)
        if present != len(value) and not self.open:
            raise self._unexpected(value, case)

    def keyval(self, value: Any) -> Any:
        if not isinstance(value, dict):
            raise Failure(TYPE, "object")
        out: dict[str, Any] = {}
        self._keyval_members(self.members, value, out)
        case = self._case(out)
        if case is not None:
            self._keyval_members(self.variants[case], value, out)
        if len(out) != len(value):
            raise self._unexpected(value, case)
        return out

    @staticmethod
    def _keyval_members(members: tuple[Member, ...], value: dict[str, Any], out: dict[str, Any]) -> None:
        for member in members:
            if member.name in value:
                try:
                    out[member.name] = member.node.keyval(value[member.name])
                except Failure as failure:
                    failure.path.append(member.name)
                    raise
            elif member.required:
                raise Failure(MISSING, path=[member.name])


class AlternateNode(Node):
    """A QAPI alternate: the JSON type of the value picks the branch."""

    __slots__ = ("branches", "by_qtype")

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.branches: tuple[Node, ...] = ()
        self.by_qtype: dict[str, Node] = {}

    def finish(self) -> None:
        """Index the branches by the QObject type each one accepts."""
        for branch in self.branches:
            key = _branch_qtype(branch)
            if key in self.by_qtype:
                raise SchemaError(f"alternate {self.name}: two branches take JSON {key}")
            self.by_qtype[key] = branch

    def check(self, value: Any) -> None:
        branch = self.by_qtype.get(qtype(value))
        if branch is None:
            raise Failure(TYPE_BARE, self.name or "")
        branch.check(value)

    def keyval(self, value: Any) -> Any:
        branch = self.by_qtype.get(qtype(value))
        if branch is None:
            raise Failure(TYPE_BARE, self.name or "")
        return branch.keyval(value)


def _branch_qtype(node: Node) -> str:
    if isinstance(node, StrNode | EnumNode):
        return "str"
    if isinstance(node, IntNode | UIntNode | NumberNode):
        return "num"
    if isinstance(node, BoolNode):
        return "bool"
    if isinstance(node, NullNode):
        return "null"
    if isinstance(node, StructNode):
        return "dict"
    if isinstance(node, ListNode):
        return "list"
    raise SchemaError(f"{type(node).__name__} cannot be an alternate branch")


# ----------------------------------------------------------------------------- compiler

_INT_RANGES: Final[dict[tuple[int, int], tuple[str, str | None]]] = {
    (I64_MIN, I64_MAX): ("int", None),
    (-(2**7), 2**7 - 1): ("int8", "int8_t"),
    (-(2**15), 2**15 - 1): ("int16", "int16_t"),
    (-(2**31), 2**31 - 1): ("int32", "int32_t"),
    (0, 2**8 - 1): ("uint8", "uint8_t"),
    (0, 2**16 - 1): ("uint16", "uint16_t"),
    (0, 2**32 - 1): ("uint32", "uint32_t"),
    (I64_MIN, U64_MAX): ("uint64", None),
}


_JSON_BUILTINS: Final = {"string": "str", "boolean": "bool", "null": "null", "number": "number"}


class Compiler:
    """Turns JSON Schema documents into :class:`Node` trees.

    ``documents`` maps absolute URIs (without fragment) to parsed JSON documents; ``$ref``
    values are resolved against the URI of the document they appear in. Named types are
    compiled once, so recursive types (BlockdevOptions -> BlockdevRef -> BlockdevOptions)
    become cyclic node graphs.
    """

    def __init__(self, documents: Mapping[str, Any], types_uri: str) -> None:
        self.documents = documents
        self.types_uri = types_uri
        self._named: dict[str, Node] = {}
        self._unfinished: list[StructNode | AlternateNode] = []
        self._builtins: dict[str, Node] = {
            "any": AnyNode("any"),
            "str": StrNode("str"),
            "bool": BoolNode("bool"),
            "null": NullNode("null"),
            "number": NumberNode("number"),
            "size": UIntNode(U64_MAX, None, is_size=True),
        }
        for (lo, hi), (name, ctype) in _INT_RANGES.items():
            self._builtins[name] = UIntNode(hi, ctype) if name.startswith("uint") else IntNode(lo, hi, ctype)
        for name, node in self._builtins.items():
            node.name = name
        # 'int64' is another name of 'int' in QAPI, with the same checks and messages.
        self._builtins["int64"] = self._builtins["int"]

    def resolve(self, base: str, ref: str) -> tuple[str, Any]:
        """The absolute URI and the contents a ``$ref`` points to."""
        uri = urljoin(base, ref)
        document_uri, fragment = urldefrag(uri)
        try:
            target = self.documents[document_uri]
        except KeyError:
            raise SchemaError(f"$ref {ref!r} (from {base}) names an unknown document") from None
        if fragment:
            if not fragment.startswith("/"):
                raise SchemaError(f"$ref {ref!r}: only JSON pointer fragments are supported")
            for token in fragment[1:].split("/"):
                token = token.replace("~1", "/").replace("~0", "~")
                try:
                    target = target[token]
                except (KeyError, TypeError):
                    raise SchemaError(f"$ref {ref!r} (from {base}) does not resolve") from None
        return uri, target

    def def_name(self, uri: str) -> str | None:
        """The type name of a ``types.json#/$defs/NAME`` URI, else None."""
        document_uri, fragment = urldefrag(uri)
        if document_uri == self.types_uri and fragment.startswith("/$defs/") and fragment.count("/") == 2:
            return fragment[len("/$defs/") :]
        return None

    def compile(self, schema: Any, base: str) -> Node:
        """Compile one schema appearing in the document at ``base``."""
        node = self._compile(schema, base, None)
        while self._unfinished:
            self._unfinished.pop().finish()
        return node

    def _compile_ref(self, base: str, ref: str) -> Node:
        uri, target = self.resolve(base, ref)
        name = self.def_name(uri)
        if name is not None and name in self._builtins:
            return self._builtins[name]
        if uri in self._named:
            return self._named[uri]
        document_uri = urldefrag(uri)[0]
        return self._compile(target, document_uri, (uri, name))

    def _compile(self, schema: Any, base: str, named: tuple[str, str | None] | None) -> Node:
        if schema is True or schema == {}:
            return self._builtins["any"]
        if not isinstance(schema, dict):
            raise SchemaError(f"unsupported schema {schema!r}")
        if "$ref" in schema:
            return self._compile_ref(base, schema["$ref"])
        name = named[1] if named else None
        if "oneOf" in schema or "anyOf" in schema:
            if name is None:
                raise SchemaError("alternates must be named types in types.json")
            alternate = AlternateNode(name)
            self._register(named, alternate)
            branches: list[Any] = schema["oneOf"] if "oneOf" in schema else schema["anyOf"]
            alternate.branches = tuple(self._compile(branch, base, None) for branch in branches)
            self._unfinished.append(alternate)
            return alternate
        if "enum" in schema:
            enum = EnumNode(list(schema["enum"]), name)
            enum.value_features = {k: tuple(v) for k, v in schema.get("x-value-features", {}).items()}
            self._register(named, enum)
            return enum
        kind = schema.get("type")
        if kind == "object":
            return self._compile_object(schema, base, named)
        if kind == "array":
            return ListNode(self._compile(schema.get("items", True), base, None))
        if kind == "integer":
            key = (schema.get("minimum"), schema.get("maximum"))
            if key not in _INT_RANGES:
                raise SchemaError(f"integer range {key} matches no QAPI integer type")
            return self._builtins[_INT_RANGES[key][0]]
        if kind in _JSON_BUILTINS:
            return self._builtins[_JSON_BUILTINS[kind]]
        if kind is None and not set(schema) - {"description", "title", "default", "examples", "$comment"}:
            return self._builtins["any"]
        raise SchemaError(f"unsupported schema {schema!r}")

    def _register(self, named: tuple[str, str | None] | None, node: Node) -> None:
        if named is not None:
            self._named[named[0]] = node

    def _members(self, schema: dict[str, Any], base: str) -> tuple[Member, ...]:
        required = set(schema.get("required", ()))
        members = []
        for member_name, member_schema in schema.get("properties", {}).items():
            features = tuple(member_schema.get("x-features", ())) if isinstance(member_schema, dict) else ()
            node = self._compile(member_schema, base, None)
            members.append(Member(member_name, node, member_name in required, features))
        unknown = required - set(schema.get("properties", {}))
        if unknown:
            raise SchemaError(f"required members without a schema: {sorted(unknown)}")
        return tuple(members)

    def _compile_object(
        self, schema: dict[str, Any], base: str, named: tuple[str, str | None] | None
    ) -> Node:
        struct = StructNode(named[1] if named else None)
        struct.features = tuple(schema.get("x-features", ()))
        self._register(named, struct)
        struct.members = self._members(schema, base)
        struct.open = schema.get("additionalProperties") is True
        discriminator = schema.get("x-discriminator")
        if discriminator is not None:
            struct.discriminator = discriminator
            tag = next((m for m in struct.members if m.name == discriminator), None)
            if tag is None or not tag.required or not isinstance(tag.node, EnumNode):
                raise SchemaError(f"union {struct.name}: discriminator must be a required enum member")
            for clause in schema.get("allOf", ()):
                case = clause["if"]["properties"][discriminator]["const"]
                if case not in tag.node.value_set:
                    raise SchemaError(f"union {struct.name}: variant {case!r} is not a {discriminator} value")
                then = clause["then"]
                then_base = base
                if "$ref" in then:
                    uri, then = self.resolve(base, then["$ref"])
                    then_base = urldefrag(uri)[0]
                struct.variants[case] = self._members(then, then_base)
        elif "allOf" in schema or "oneOf" in schema:
            raise SchemaError(f"object {struct.name}: composition needs x-discriminator")
        self._unfinished.append(struct)
        return struct
