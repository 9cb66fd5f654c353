"""Sans-I/O QMP input: raw bytes in, parsed JSON messages or parse errors out.

QEMU reads QMP input through three layers (``qobject/json-lexer.c``,
``json-streamer.c``, ``json-parser.c``): a byte-level lexer with an error-recovery
mode, a streamer that cuts the token stream into messages by counting braces and
brackets and enforces size/count/depth limits, and a recursive-descent parser.  This
module reproduces what those layers make observable -- which messages and errors come
out, in which order, with which texts -- as QEMU 7.2 does with interpolation disabled
(the QMP configuration).

Two paths produce results:

* the exact path, a table-driven lexer (sped up with regular expressions for runs of
  bytes that keep the lexer in the same state) feeding an incremental parser;
* a fast path for the common case -- whole ``{...}``/``[...]`` messages in plain ASCII
  without ``\\u`` escapes -- that lets the C ``json`` module do the work.  It only
  accepts messages on which both paths provably agree and hands everything else to
  the exact path, so the results never depend on which path ran (the tests check this).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_COUNT",
    "MAX_TOKEN_SIZE",
    "JSONParseError",
    "JSONStreamer",
    "JSONValue",
]

# QEMU's limits (json-lexer.c / json-streamer.c).
MAX_TOKEN_SIZE: Final = 64 << 20
MAX_TOKEN_COUNT: Final = 2 << 20
MAX_NESTING: Final = 1 << 10

JSONValue = dict[str, Any] | list[Any] | str | int | float | bool | None


@dataclass(frozen=True)
class JSONParseError:
    """Input QEMU rejects before dispatch; it answers with a GenericError with this desc and no id.

    ``desc`` holds what QEMU's JSON writer would print: bytes that are not valid (modified)
    UTF-8 appear as U+FFFD, ``\\xC0\\x80`` as U+0000, and a NUL byte ends the text.
    Control characters are left raw; the writer escapes them.
    """

    desc: str


# --------------------------------------------------------------------------------------
# Token types and lexer states

_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA = 1, 2, 3, 4, 5, 6
_INTEGER, _FLOAT, _KEYWORD, _STRING = 7, 8, 9, 10

(_START, _RECOVERY, _DQ, _DQ_ESC, _SQ, _SQ_ESC, _ZERO, _SIGN, _DIGITS, _MANT, _MANT_DIGITS,
 _EXP_E, _EXP_SIGN, _EXP_DIGITS, _KEYWORD_ST) = range(15)

# A table entry packs an action kind (high bits) and its argument (low 5 bits).
_GOTO = 0 << 5      # consume the byte into the token, go to state <arg>
_EMIT_LA = 1 << 5   # the byte ends the token without belonging to it: emit <arg>, re-read the byte
_EMIT = 2 << 5      # the byte completes token <arg>
_ERROR = 3 << 5     # lexical error; the byte is part of the stray text
_RESYNC = 4 << 5    # leave recovery; re-read the byte from the start state
_KIND_MASK = 0xE0
_ARG_MASK = 0x1F

_STRUCTURAL: Final = {
    ord("{"): _LCURLY, ord("}"): _RCURLY, ord("["): _LSQUARE,
    ord("]"): _RSQUARE, ord(":"): _COLON, ord(","): _COMMA,
}


def _build_table() -> list[list[int]]:
    table = [[_ERROR] * 256 for _ in range(15)]

    def put(state: int, chars: bytes | range, action: int) -> None:
        for c in chars:
            table[state][c] = action

    digits = b"0123456789"
    letters = bytes(range(ord("a"), ord("z") + 1))

    start = table[_START]
    put(_START, b'"', _GOTO | _DQ)
    put(_START, b"'", _GOTO | _SQ)
    put(_START, b"0", _GOTO | _ZERO)
    put(_START, b"123456789", _GOTO | _DIGITS)
    put(_START, b"-", _GOTO | _SIGN)
    put(_START, letters, _GOTO | _KEYWORD_ST)
    put(_START, b" \t\r\n", _GOTO | _START)
    for c, ttype in _STRUCTURAL.items():
        start[c] = _EMIT | ttype

    # Recovery skips to a byte that is a plausible message boundary, or one a client
    # sends on purpose to resynchronise (see the QMP spec), and re-reads it.
    put(_RECOVERY, range(0x00, 0x20), _RESYNC)
    put(_RECOVERY, range(0x20, 0xFE), _GOTO | _RECOVERY)
    put(_RECOVERY, b"\xfe\xff", _RESYNC)
    put(_RECOVERY, b"\t", _GOTO | _RECOVERY)
    put(_RECOVERY, b"[]{}:,", _RESYNC)

    for plain, esc, quote in ((_DQ, _DQ_ESC, b'"'), (_SQ, _SQ_ESC, b"'")):
        put(plain, range(0x20, 0xFE), _GOTO | plain)
        put(plain, b"\\", _GOTO | esc)
        put(plain, quote, _EMIT | _STRING)
        # Any printable byte may follow a backslash; the parser judges the escape.
        put(esc, range(0x20, 0xFE), _GOTO | plain)

    put(_ZERO, range(256), _EMIT_LA | _INTEGER)
    put(_ZERO, digits, _ERROR)
    put(_ZERO, b".", _GOTO | _MANT)

    put(_SIGN, b"0", _GOTO | _ZERO)
    put(_SIGN, b"123456789", _GOTO | _DIGITS)

    put(_DIGITS, range(256), _EMIT_LA | _INTEGER)
    put(_DIGITS, digits, _GOTO | _DIGITS)
    put(_DIGITS, b"eE", _GOTO | _EXP_E)
    put(_DIGITS, b".", _GOTO | _MANT)

    put(_MANT, digits, _GOTO | _MANT_DIGITS)

    put(_MANT_DIGITS, range(256), _EMIT_LA | _FLOAT)
    put(_MANT_DIGITS, digits, _GOTO | _MANT_DIGITS)
    put(_MANT_DIGITS, b"eE", _GOTO | _EXP_E)

    put(_EXP_E, b"+-", _GOTO | _EXP_SIGN)
    put(_EXP_E, digits, _GOTO | _EXP_DIGITS)
    put(_EXP_SIGN, digits, _GOTO | _EXP_DIGITS)

    put(_EXP_DIGITS, range(256), _EMIT_LA | _FLOAT)
    put(_EXP_DIGITS, digits, _GOTO | _EXP_DIGITS)

    put(_KEYWORD_ST, range(256), _EMIT_LA | _KEYWORD)
    put(_KEYWORD_ST, letters, _GOTO | _KEYWORD_ST)
    return table


_TABLE: Final = _build_table()

# Runs of bytes that leave the lexer in its current state, per state.  In the start and
# recovery states the bytes are dropped; elsewhere they extend the current token.
_RUNS: Final[list[re.Pattern[bytes] | None]] = [None] * 15
_RUNS[_START] = re.compile(rb"[ \t\r\n]+")
_RUNS[_RECOVERY] = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]+")
_RUNS[_DQ] = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]+')
_RUNS[_SQ] = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]+")
_RUNS[_DIGITS] = _RUNS[_MANT_DIGITS] = _RUNS[_EXP_DIGITS] = re.compile(rb"[0-9]+")
_RUNS[_KEYWORD_ST] = re.compile(rb"[a-z]+")

# Whole tokens recognisable from the start state in one match.  Tokens that end by
# lookahead need the byte after them to be present and to be one the table would not
# consume; anything else (errors, tokens cut by the end of the buffer) is left to the table.
_START_TOKEN: Final = re.compile(
    rb"[ \t\r\n]+"
    rb"|([{}\[\]:,])"
    rb"|(\"[^\"\\\x00-\x1f\xfe\xff]*\"|'[^'\\\x00-\x1f\xfe\xff]*')"
    rb"|([a-z]+)(?=[^a-z])"
    rb"|(-?(?:0(?=[^0-9.])|[1-9][0-9]*(?=[^0-9.eE])))"
    rb"|(-?(?:(?:0|[1-9][0-9]*)\.[0-9]+(?=[^0-9eE])"
    rb"|(?:0\.[0-9]+|[1-9][0-9]*(?:\.[0-9]+)?)[eE][-+]?[0-9]+(?=[^0-9])))"
)
_GROUP_TYPE: Final = (0, 0, _STRING, _KEYWORD, _INTEGER, _FLOAT)

# --------------------------------------------------------------------------------------
# Text conversions with QEMU's (modified) UTF-8 rules

_MIN_CP: Final = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)

# Noncharacters: U+FDD0..U+FDEF and the last two code points of every plane.
_NONCHAR: Final = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr((plane << 16) | 0xFFFE) + chr((plane << 16) | 0xFFFF) for plane in range(17))
    + "]"
)


def _valid_codepoint(cp: int) -> bool:
    return (
        0 <= cp <= 0x10FFFF
        and not 0xFDD0 <= cp <= 0xFDEF
        and (cp & 0xFFFE) != 0xFFFE
        and not 0xD800 <= cp <= 0xDFFF
    )


def _mod_utf8_at(buf: bytes, i: int) -> tuple[int, int]:
    """Decode the sequence at ``buf[i]`` as QEMU's mod_utf8_codepoint() does.

    Returns (code point or -1, index after the sequence).  QEMU reads C strings, so
    running off the end of ``buf`` behaves like meeting a NUL byte.
    """
    byte = buf[i]
    if byte < 0x80:
        return byte, i + 1
    if byte >= 0xFE or not byte & 0x40:
        return -1, i + 1
    length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4 if byte < 0xF8 else 5 if byte < 0xFC else 6
    cp = byte & (0x7F >> length)
    j = i + 1
    for _ in range(1, length):
        nxt = buf[j] if j < len(buf) else 0
        if nxt & 0xC0 != 0x80:
            return -1, j
        cp = (cp << 6) | (nxt & 0x3F)
        j += 1
    if not _valid_codepoint(cp):
        return -1, j
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, j
    return cp, j


class _BadUTF8(Exception):
    pass


def _writer_errors(exc: UnicodeError) -> tuple[str, int]:
    # Python's decoder already agrees with QEMU on every sequence it accepts, except
    # noncharacters (handled after decoding); at a sequence it rejects, QEMU's rules
    # decide how much to skip and whether it is the special \xC0\x80.
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    cp, end = _mod_utf8_at(exc.object, exc.start)
    return ("\ufffd" if cp < 0 else chr(cp)), end


def _string_errors(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    cp, end = _mod_utf8_at(exc.object, exc.start)
    if cp < 0:
        raise _BadUTF8
    return chr(cp), end


_WRITER_ERRORS: Final = "qmp_server.protocol.framing.writer"
_STRING_ERRORS: Final = "qmp_server.protocol.framing.string"
codecs.register_error(_WRITER_ERRORS, _writer_errors)
codecs.register_error(_STRING_ERRORS, _string_errors)


def _c_text(raw: bytes) -> str:
    """The text QEMU's JSON writer shows for the C string ``raw``."""
    nul = raw.find(0)
    if nul >= 0:
        raw = raw[:nul]
    if raw.isascii():
        return raw.decode("ascii")
    return _NONCHAR.sub("\ufffd", raw.decode("utf-8", _WRITER_ERRORS))


class _ParseFailure(Exception):
    """A json-parser.c error; ``args[0]`` is the message bytes after "JSON parse error, "."""


_SIMPLE_ESCAPES: Final = {
    ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
    ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
}
_HEX: Final = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


def _decode_segment(seg: bytes) -> str:
    if seg.isascii():
        return seg.decode("ascii")
    try:
        text = seg.decode("utf-8", _STRING_ERRORS)
    except _BadUTF8:
        raise _ParseFailure(b"invalid UTF-8 sequence in string") from None
    if _NONCHAR.search(text):
        raise _ParseFailure(b"invalid UTF-8 sequence in string")
    return text


def _hex4(buf: bytes, p: int) -> int:
    """Four hex digits at ``buf[p:]`` or -1; stops at the first non-digit like QEMU."""
    cp = 0
    for k in range(p, p + 4):
        digit = _HEX.get(buf[k]) if k < len(buf) else None
        if digit is None:
            return -1
        cp = (cp << 4) | digit
    return cp


def _parse_string(tok: bytes) -> str:
    """Value of a string token (quotes included), or _ParseFailure with QEMU's message."""
    body = tok[1:-1]
    if b"\\" not in body:
        return _decode_segment(body)
    parts: list[str] = []
    # QEMU scans the NUL-terminated token; \u reads up to four bytes past the backslash
    # even when the closing quote comes first, which shows in its error message.
    tokz = tok + b"\0"
    i = 0
    while True:
        j = body.find(b"\\", i)
        if j < 0:
            parts.append(_decode_segment(body[i:]))
            return "".join(parts)
        if j > i:
            parts.append(_decode_segment(body[i:j]))
        esc = body[j + 1]
        simple = _SIMPLE_ESCAPES.get(esc)
        if simple is not None:
            parts.append(simple)
            i = j + 2
            continue
        if esc != ord("u"):
            raise _ParseFailure(b"invalid escape sequence in string")
        beg = j + 1  # index of the backslash in tok
        ptr = beg + 2
        cp = _hex4(tokz, ptr)
        ptr += 4
        if 0xD800 <= cp <= 0xDBFF and tokz[ptr:ptr + 2] == b"\\u":
            low = _hex4(tokz, ptr + 2)
            if 0xDC00 <= low <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
                ptr += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            shown = tokz[beg:ptr]
            raise _ParseFailure(shown.split(b"\0", 1)[0] + b" is not a valid Unicode character")
        parts.append(chr(cp))
        i = ptr - 1


_I64_MIN: Final = -(1 << 63)
_U64_MAX: Final = (1 << 64) - 1


def _big_integer(text: bytes | str) -> int | float:
    # QEMU keeps an integer as int64, else uint64, else converts the text with strtod.
    # Length first: int() refuses very long digit strings, and they are doubles anyway.
    if len(text) > 21:
        return float(text)
    value = int(text)
    if _I64_MIN <= value <= _U64_MAX:
        return value
    return float(text)


def _fast_int(text: str) -> int | float:
    if len(text) < 19:
        return int(text)
    return _big_integer(text)


# --------------------------------------------------------------------------------------
# Fast path

class _Reject(ValueError):
    pass


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Reject("duplicate key")
    return result


def _reject_constant(name: str) -> Any:
    raise _Reject(name)


# Input the json module might read differently from QEMU: non-ASCII bytes (QEMU's UTF-8
# rules differ), \u escapes (surrogates, noncharacters), and a number starting with a
# zero followed by an exponent (QEMU lexes "0e5" as 0, e, 5; Python as 0.0).  Single
# quotes are valid only in QEMU's dialect; keeping them out saves a doomed json attempt.
_FAST_BAD_BYTE: Final = re.compile(rb"[\x80-\xff']")
_DIGIT_OR_DOT: Final = frozenset(b"0123456789.")


def _fast_limit(data: bytes, pos: int) -> int:
    """Where the stretch of ``data`` from ``pos`` that the fast path may read ends."""
    m = _FAST_BAD_BYTE.search(data, pos)
    limit = m.start() if m is not None else len(data)
    j = data.find(b"\\u", pos, limit)
    if j >= 0:
        limit = j
    for zero_exp in (b"0e", b"0E"):
        j = data.find(zero_exp, pos, limit)
        while j >= 0:
            if j == pos or data[j - 1] not in _DIGIT_OR_DOT:
                limit = j
                break
            j = data.find(zero_exp, j + 1, limit)
    return limit


_FAST_WS: Final = re.compile(r"[ \t\r\n]*")
_WS_RUN: Final = re.compile(rb"[ \t\r\n]*")
_OPENERS: Final = frozenset(b"{[")
# Messages in QEMU's single-quote dialect usually show it right away.
_SQ_MESSAGE: Final = re.compile(rb"[{\[][ \t\r\n]*'")

_MessageDecoder = Callable[[str, int], tuple[Any, int]]

# --------------------------------------------------------------------------------------
# Parser states (what the innermost open container expects next)

_A_FIRST, _A_VALUE, _A_SEP = 0, 1, 2           # after "[", after ",", after an element
_D_FIRST, _D_KEY, _D_COLON, _D_VALUE, _D_SEP = 3, 4, 5, 6, 7

_SIZE_ERROR: Final = JSONParseError("JSON token size limit exceeded")
_COUNT_ERROR: Final = JSONParseError("JSON token count limit exceeded")
_NESTING_ERROR: Final = JSONParseError("JSON nesting depth limit exceeded")

# parse_error() formats into a 1024-byte buffer.
_PARSE_MESSAGE_MAX: Final = 1023


class JSONStreamer:
    """Incremental QMP input decoder with QEMU's framing, error texts and recovery.

    One instance per connection.  ``feed()`` takes whatever bytes arrived and returns
    what QEMU would have handed to its dispatcher for them: parsed values (usually
    dicts) and :class:`JSONParseError` for input it rejects, in order.  Results do not
    depend on how the input is split between calls.

    The keyword arguments exist for tests; the defaults are QEMU's limits.
    ``fast_path=False`` forces the exact (slower) path for every byte.
    """

    def __init__(
        self,
        *,
        max_token_size: int = MAX_TOKEN_SIZE,
        max_token_count: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
        fast_path: bool = True,
    ) -> None:
        self._max_size = max_token_size
        self._max_count = max_token_count
        self._max_nesting = max_nesting
        self._fast = fast_path
        # The fast path must not take a message the limits would reject.
        self._fast_max_len = min(max_token_count, max_token_size - 1)
        decoder = json.JSONDecoder(
            object_pairs_hook=_pairs_hook, parse_int=_fast_int, parse_constant=_reject_constant
        )
        self._raw_decode: _MessageDecoder = decoder.raw_decode
        # lexer
        self._state = _START
        self._tok = bytearray()
        # streamer
        self._braces = 0
        self._brackets = 0
        self._ntok = 0
        self._tsize = 0
        # parser
        self._stack: list[list[Any]] = []
        self._perr: bytes | None = None
        self._done = False
        self._result: Any = None
        self._out: list[JSONValue | JSONParseError] = []

    # ---------------------------------------------------------------- public

    def at_boundary(self) -> bool:
        """True when no part of a message (or of a token) is buffered."""
        return self._state == _START and self._ntok == 0 and not self._tok

    def feed(self, data: bytes) -> list[JSONValue | JSONParseError]:
        """Feed raw bytes from the socket; return the complete messages (and errors) in order."""
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[JSONValue | JSONParseError] = []
        self._out = out
        n = len(data)
        pos = 0
        text = ""      # decoded copy of data[base:limit], the stretch the fast path may read
        base = limit = 0
        closers = (-1, -1)
        while pos < n:
            if self._fast and self._state == _START and self._ntok == 0:
                pos = _WS_RUN.match(data, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
                if data[pos] in _OPENERS and _SQ_MESSAGE.match(data, pos) is None:
                    if pos >= limit:
                        base, limit = pos, _fast_limit(data, pos)
                        text = data[base:limit].decode("ascii")
                        # A message cannot be complete past the last closer; knowing
                        # where it is keeps hopeless attempts O(1).
                        closers = (text.rfind("}"), text.rfind("]"))
                    pos = self._fast_messages(text, base, pos, closers, out)
                    if pos >= n:
                        break
            pos = self._lex(data, pos)
        self._out = []
        return out

    def flush(self) -> list[JSONValue | JSONParseError]:
        """End of input, as json_lexer_flush: finish or refuse the pending token, then
        parse what the current message has (QEMU's qobject_from_json does this; a QMP
        connection never flushes).

        Like QEMU the lexer is fed NULs it does not consume until it is idle: a number or
        keyword ends there, an unfinished string is stray text.
        """
        out: list[JSONValue | JSONParseError] = []
        self._out = out
        # Each step leaves a state that reaches _START in at most two more (error ->
        # recovery -> start); the bound only guards against a table mistake.
        for _ in range(4):
            if self._state == _START:
                break
            action = _TABLE[self._state][0]
            kind = action & _KIND_MASK
            if kind in (_EMIT_LA, _EMIT):
                self._state = _START
                self._end_token(action & _ARG_MASK)
            elif kind == _ERROR:
                self._state = _RECOVERY
                self._end_stray()
            elif kind == _RESYNC:
                self._state = _START
            else:  # _GOTO: the NUL is not consumed, only the state moves
                self._state = action & _ARG_MASK
        if self._ntok:
            # JSON_END_OF_INPUT with tokens queued: json_parser_parse sees them end early.
            self._finish_message()
        self._out = []
        return out

    # ---------------------------------------------------------------- fast path

    def _fast_messages(
        self, text: str, base: int, pos: int, closers: tuple[int, int],
        out: list[JSONValue | JSONParseError],
    ) -> int:
        """Decode whole messages at ``pos`` with the json module; return where it stopped.

        ``text`` is the stretch of input starting at offset ``base`` that the fast path may
        read; ``closers`` are the positions in it of the last "}" and the last "]".
        """
        i = pos - base
        last_curly, last_square = closers
        raw_decode = self._raw_decode
        while True:
            i = _FAST_WS.match(text, i).end()  # type: ignore[union-attr]
            if i >= len(text):
                return base + i
            first = text[i]
            if first == "{":
                if last_curly < i:
                    return base + i
            elif first != "[" or last_square < i:
                return base + i
            try:
                value, end = raw_decode(text, i)
            except (ValueError, RecursionError):
                return base + i
            if end - i > self._fast_max_len:
                return base + i
            if text.count("{", i, end) + text.count("[", i, end) > self._max_nesting:
                return base + i
            out.append(value)
            i = end

    # ---------------------------------------------------------------- lexer

    def _lex(self, data: bytes, pos: int) -> int:
        """Run the exact lexer from ``pos``.

        Returns at the end of ``data``, or earlier once a message is complete and the
        lexer is idle, so that ``feed()`` can try the fast path again.
        """
        n = len(data)
        state = self._state
        tok = self._tok
        max_size = self._max_size
        fast = self._fast
        table = _TABLE
        runs = _RUNS
        start_token = _START_TOKEN.match
        while pos < n:
            if state == _START:
                m = start_token(data, pos)
                if m is not None:
                    group = m.lastindex
                    end = m.end()
                    if group is None:
                        pos = end
                        continue
                    if end - pos <= max_size:
                        if group == 1:
                            self._token(_STRUCTURAL[data[pos]], 1, b"")
                        else:
                            self._token(_GROUP_TYPE[group], end - pos, data[pos:end])
                        pos = end
                        if fast and self._ntok == 0:
                            break
                        continue
            run = runs[state]
            if run is not None:
                m = run.match(data, pos)
                if m is not None:
                    end = m.end()
                    if state <= _RECOVERY:
                        pos = end
                    else:
                        room = max_size + 1 - len(tok)
                        if end - pos >= room:
                            # QEMU checks the token size after every byte.
                            pos += room
                            tok.clear()
                            state = _START
                            self._limit_error(_SIZE_ERROR)
                            continue
                        tok += data[pos:end]
                        pos = end
                    if pos >= n:
                        break
            byte = data[pos]
            action = table[state][byte]
            kind = action & _KIND_MASK
            arg = action & _ARG_MASK
            if kind == _GOTO:
                pos += 1
                if arg > _RECOVERY:
                    tok.append(byte)
                    if len(tok) > max_size:
                        tok.clear()
                        arg = _START
                        self._limit_error(_SIZE_ERROR)
                state = arg
            elif kind == _EMIT_LA or kind == _EMIT:
                if kind == _EMIT:  # the byte completes the token; else it is re-read
                    tok.append(byte)
                    pos += 1
                state = _START
                self._end_token(arg)
                if fast and self._ntok == 0:
                    break
            elif kind == _ERROR:
                tok.append(byte)
                pos += 1
                state = _RECOVERY
                self._end_stray()
            else:  # _RESYNC
                state = _START
        self._state = state
        return pos

    def _end_token(self, ttype: int) -> None:
        """The buffered token is complete: account for it and start the next."""
        text = bytes(self._tok)
        self._tok.clear()
        self._token(ttype, len(text), text)

    def _end_stray(self) -> None:
        """The buffered bytes are no token (JSON_ERROR): report them as stray."""
        text = bytes(self._tok)
        self._tok.clear()
        self._stray(text)

    # ---------------------------------------------------------------- streamer

    def _reset_message(self) -> None:
        self._braces = 0
        self._brackets = 0
        self._ntok = 0
        self._tsize = 0
        self._stack.clear()
        self._perr = None
        self._done = False
        self._result = None

    def _stray(self, text: bytes) -> None:
        self._reset_message()
        self._out.append(JSONParseError("JSON parse error, stray '" + _c_text(text) + "'"))

    def _limit_error(self, error: JSONParseError) -> None:
        self._reset_message()
        self._out.append(error)

    def _token(self, ttype: int, size: int, text: bytes) -> None:
        """Account for one token as json-streamer.c does; emit a message when it is complete."""
        if ttype <= _RSQUARE:
            if ttype == _LCURLY:
                self._braces += 1
            elif ttype == _RCURLY:
                self._braces -= 1
            elif ttype == _LSQUARE:
                self._brackets += 1
            else:
                self._brackets -= 1
        if self._tsize + size + 1 > self._max_size:
            self._limit_error(_SIZE_ERROR)
            return
        if self._ntok + 1 > self._max_count:
            self._limit_error(_COUNT_ERROR)
            return
        braces = self._braces
        brackets = self._brackets
        if braces + brackets > self._max_nesting:
            self._limit_error(_NESTING_ERROR)
            return
        self._tsize += size
        self._ntok += 1
        if self._perr is None:
            self._parse_token(ttype, text)
        if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
            return
        self._finish_message()

    def _finish_message(self) -> None:
        """Hand the current message's outcome to the output: its value, the parser's first
        error, or "premature EOI" when its tokens end before the value does (only at the
        end of input: the streamer cuts after a closing token)."""
        if self._perr is not None:
            message = self._perr[:_PARSE_MESSAGE_MAX]
            result: JSONValue | JSONParseError = JSONParseError("JSON parse error, " + _c_text(message))
        elif self._done:
            result = self._result
        else:
            result = JSONParseError("JSON parse error, premature EOI")
        self._reset_message()
        self._out.append(result)

    # ---------------------------------------------------------------- parser

    def _parse_token(self, ttype: int, text: bytes) -> None:
        """Advance the incremental parser by one token.

        json-parser.c parses a finished token list recursively and reports the first
        error; a push parser that stops at its first error reports the same one.
        """
        stack = self._stack
        if stack:
            frame = stack[-1]
            st = frame[1]
            if st == _A_SEP:
                if ttype == _RSQUARE:
                    stack.pop()
                    self._deliver(frame[0])
                elif ttype == _COMMA:
                    frame[1] = _A_VALUE
                else:
                    self._perr = b"expected separator in list"
                return
            if st == _D_SEP:
                if ttype == _RCURLY:
                    stack.pop()
                    self._deliver(frame[0])
                elif ttype == _COMMA:
                    frame[1] = _D_KEY
                else:
                    self._perr = b"expected separator in dict"
                return
            if st == _D_COLON:
                if ttype == _COLON:
                    frame[1] = _D_VALUE
                else:
                    self._perr = b"missing : in object pair"
                return
            if st == _A_FIRST and ttype == _RSQUARE:
                stack.pop()
                self._deliver(frame[0])
                return
            if st == _D_FIRST and ttype == _RCURLY:
                stack.pop()
                self._deliver(frame[0])
                return
        # A value is expected.
        value: Any
        if ttype == _STRING:
            if b"\\" not in text and text.isascii():
                value = text[1:-1].decode("ascii")
            else:
                try:
                    value = _parse_string(text)
                except _ParseFailure as exc:
                    self._perr = exc.args[0]
                    return
        elif ttype == _LCURLY:
            stack.append([{}, _D_FIRST, None])
            return
        elif ttype == _LSQUARE:
            stack.append([[], _A_FIRST, None])
            return
        elif ttype == _INTEGER:
            value = int(text) if len(text) < 19 else _big_integer(text)
        elif ttype == _FLOAT:
            value = float(text)
        elif ttype == _KEYWORD:
            if text == b"true":
                value = True
            elif text == b"false":
                value = False
            elif text == b"null":
                value = None
            else:
                self._perr = b"invalid keyword '" + text + b"'"
                return
        else:
            self._perr = b"expecting value"
            return
        self._deliver(value)

    def _deliver(self, value: Any) -> None:
        stack = self._stack
        if not stack:
            self._result = value
            self._done = True
            return
        frame = stack[-1]
        st = frame[1]
        if st <= _A_VALUE:
            frame[0].append(value)
            frame[1] = _A_SEP
        elif st != _D_VALUE:  # a key: _D_FIRST or _D_KEY
            if type(value) is not str:
                self._perr = b"key is not a string in object"
                return
            frame[2] = value
            frame[1] = _D_COLON
        else:
            container = frame[0]
            key = frame[2]
            if key in container:
                self._perr = b"duplicate key"
                return
            container[key] = value
            frame[1] = _D_SEP
