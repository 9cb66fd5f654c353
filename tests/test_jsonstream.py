"""JSONStreamer: QEMU's QMP input framing, parsing, error texts and recovery.

Expected results were observed on QEMU 7.2 (tests/test_jsonstream_qemu.py re-checks
most of them against a live QEMU).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmp_server.protocol.framing import (
    MAX_NESTING,
    MAX_TOKEN_COUNT,
    MAX_TOKEN_SIZE,
    JSONParseError,
    JSONStreamer,
)

QUERY_STATUS = b'{"execute":"query-status"}'


def E(msg: str) -> JSONParseError:
    """A parse error with QEMU's "JSON parse error, " prefix."""
    return JSONParseError("JSON parse error, " + msg)


def stray(text: str) -> JSONParseError:
    return E(f"stray '{text}'")


def feed_all(data: bytes, chunk: int | None = None, **kwargs: Any) -> list[Any]:
    streamer = JSONStreamer(**kwargs)
    if chunk is None:
        return streamer.feed(data)
    out: list[Any] = []
    for i in range(0, len(data), chunk):
        out += streamer.feed(data[i:i + chunk])
    return out


def strict(results: list[Any]) -> str:
    """A form that tells 1, 1.0 and True (and -0.0 and 0.0) apart."""
    return repr(results)


def check(data: bytes, expected: list[Any]) -> None:
    """Whole, byte by byte, and through the exact path: all must give ``expected``."""
    for chunk in (None, 1, 5):
        for fast in (True, False):
            assert strict(feed_all(data, chunk, fast_path=fast)) == strict(expected), (chunk, fast)


# ------------------------------------------------------------------ framing


def test_one_command() -> None:
    check(QUERY_STATUS, [{"execute": "query-status"}])


def test_no_newline_needed_and_several_per_feed() -> None:
    check(QUERY_STATUS + b' {"execute":"stop","id":1}\r\n[1,2]',
          [{"execute": "query-status"}, {"execute": "stop", "id": 1}, [1, 2]])


def test_incomplete_message_waits() -> None:
    streamer = JSONStreamer()
    assert streamer.feed(b'{"execute": "query-') == []
    assert streamer.feed(b'status", "arguments": {') == []
    assert streamer.feed(b"}}") == [{"execute": "query-status", "arguments": {}}]


def test_top_level_scalars() -> None:
    # Strings end at their quote; numbers and keywords need the next byte to end.
    streamer = JSONStreamer()
    assert streamer.feed(b'"x"') == ["x"]
    assert streamer.feed(b"42") == []
    assert streamer.feed(b"\n") == [42]
    assert streamer.feed(b"true") == []
    assert streamer.feed(b"{}") == [True, {}]
    check(b"1 2 3 null ", [1, 2, 3, None])
    check(b'"a""b"[]', ["a", "b", []])


def test_key_order_kept() -> None:
    check(b'{"z":1,"a":2,"m":{"y":1,"b":2}}', [{"z": 1, "a": 2, "m": {"y": 1, "b": 2}}])


def test_single_quotes() -> None:
    check(b"{'execute': 'query-status', 'id': 'it\\'s \"quoted\"'}",
          [{"execute": "query-status", "id": "it's \"quoted\""}])
    check(b'"a\\\'b"', ["a'b"])


def test_closing_more_than_opened_cuts_the_message() -> None:
    check(b"{]", [E("expecting value")])
    check(b"[}", [E("expecting value")])
    check(b"[}]", [E("expecting value"), E("expecting value")])
    check(b"}]", [E("expecting value"), E("expecting value")])
    check(b"[{]}", [E("expecting value")])
    # balanced counts, wrong kinds: waits for more
    check(b'{"a":[}', [])


# ------------------------------------------------------------------ values


def test_numbers() -> None:
    check(b"[0, -0, 7, -7, 0.5, -0.0, 1E2, 1e+2, 2.5e-3]",
          [[0, 0, 7, -7, 0.5, -0.0, 100.0, 100.0, 0.0025]])


def test_integer_ranges_follow_qemu() -> None:
    # int64, then uint64, then strtod
    check(b"[9223372036854775807, -9223372036854775808, 18446744073709551615]",
          [[9223372036854775807, -9223372036854775808, 18446744073709551615]])
    check(b"[18446744073709551616, -9223372036854775809]",
          [[18446744073709551616.0, -9223372036854775809.0]])
    [[huge]] = feed_all(b"[" + b"9" * 5000 + b"]")
    assert huge == math.inf
    check(b"[1e400, -1e400, 1e-400]", [[math.inf, -math.inf, 0.0]])


def test_zero_then_exponent_is_three_tokens() -> None:
    check(b"0e5 ", [0, E("invalid keyword 'e'"), 5])
    check(b"[0e5]", [E("expected separator in list")])
    check(b"[0.0e5, 10e1]", [[0.0, 100.0]])


def test_string_escapes() -> None:
    check(b'["\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u20AC"]', [['"\\/\b\f\n\r\t\u00e9\u20ac']])
    check(b'["\\ud83d\\ude00", "\\uDBFF\\uDFFD", "\\uFDCF"]', [["\U0001f600", "\U0010fffd", "\ufdcf"]])


def test_nul_in_strings() -> None:
    # QEMU keeps U+0000 as modified UTF-8 "\xC0\x80", which its writer prints as \u0000.
    check(b'{"execute":"a\\u0000b"}', [{"execute": "a\x00b"}])
    check(b'{"execute":"a\xc0\x80b"}', [{"execute": "a\x00b"}])


def test_utf8_strings() -> None:
    check('["aéb€😀\x7f"]'.encode(), [["aéb€😀\x7f"]])


@pytest.mark.parametrize(("data", "error"), [
    (b'["a\xef\xbf\xbeb"]', "invalid UTF-8 sequence in string"),  # noncharacter U+FFFE
    (b'["a\xe9b"]', "invalid UTF-8 sequence in string"),
    (b'["\xc1\xbf"]', "invalid UTF-8 sequence in string"),  # overlong
    (b'["\xed\xa0\x80"]', "invalid UTF-8 sequence in string"),  # surrogate
    (b'["\xf4\x90\x80\x80"]', "invalid UTF-8 sequence in string"),  # beyond U+10FFFF
    (b'["a\\qb"]', "invalid escape sequence in string"),
    (b'["\\U00e9"]', "invalid escape sequence in string"),
    (b'["a\\uFFFEb"]', "\\uFFFE is not a valid Unicode character"),
    (b'["\\uFDD0"]', "\\uFDD0 is not a valid Unicode character"),
    (b'["a\\ud800b"]', "\\ud800 is not a valid Unicode character"),
    (b'["a\\ud800\\u0041b"]', "\\ud800 is not a valid Unicode character"),
    (b'["\\ud83dx"]', "\\ud83d is not a valid Unicode character"),
    (b'["\\ud83d\\u"]', "\\ud83d is not a valid Unicode character"),
    (b'["a\\udc00b"]', "\\udc00 is not a valid Unicode character"),
    (b'["a\\ud83f\\udffeb"]', "\\ud83f\\udffe is not a valid Unicode character"),
    (b'["\\uDBFF\\uDFFF"]', "\\uDBFF\\uDFFF is not a valid Unicode character"),
    # QEMU reads four bytes after "\u" even past the closing quote
    (b'["a\\u12"]', '\\u12" is not a valid Unicode character'),
    (b'["a\\u"]', '\\u" is not a valid Unicode character'),
    (b'["a\\u12xyzw"]', "\\u12xy is not a valid Unicode character"),
    (b'["\\u\xc3\xa9"]', '\\u\u00e9" is not a valid Unicode character'),
    (b'["\\u12\xc3\xa9"]', "\\u12\u00e9 is not a valid Unicode character"),
    (b'["\\u1\xc3"]', '\\u1\ufffd" is not a valid Unicode character'),
])
def test_string_errors(data: bytes, error: str) -> None:
    check(data, [E(error)])


def test_first_string_error_wins() -> None:
    check(b'["\xe9\\q"]', [E("invalid UTF-8 sequence in string")])
    check(b'["\\q\xe9"]', [E("invalid escape sequence in string")])


# ------------------------------------------------------------------ parser errors


@pytest.mark.parametrize(("data", "error"), [
    (b'{"execute": }', "expecting value"),
    (b'{"a":1,"a":2}', "duplicate key"),
    (b'{"a":{"b":1,"b":2},"a":3}', "duplicate key"),
    (b'{"a":1,"a":}', "expecting value"),  # the value is parsed before the key is checked
    (b'{"a":1,"a":"\\q"}', "invalid escape sequence in string"),
    (b"{1:2}", "key is not a string in object"),
    (b"{1:}", "key is not a string in object"),
    (b"{[1]:3}", "key is not a string in object"),
    (b"{{}:1}", "key is not a string in object"),
    (b"{[1,}:3}", "expecting value"),  # errors inside a key come first
    (b'{"\\q":1}', "invalid escape sequence in string"),
    (b'{"a" 1}', "missing : in object pair"),
    (b'{"a"]', "missing : in object pair"),
    (b'{"a":1,"b"}', "missing : in object pair"),
    (b'{"a":1 "b":2}', "expected separator in dict"),
    (b'{"a":1]', "expected separator in dict"),
    (b"[1 2]", "expected separator in list"),
    (b"[1,2}", "expected separator in list"),
    (b"[1,]", "expecting value"),
    (b'{"a":1,}', "expecting value"),
    (b"{,}", "expecting value"),
    (b"[,]", "expecting value"),
    (b"{:}", "expecting value"),
    (b"}", "expecting value"),
    (b"]", "expecting value"),
    (b"{foo:1}", "invalid keyword 'foo'"),
    (b"[truex]", "invalid keyword 'truex'"),
    (b"[nul]", "invalid keyword 'nul'"),
])
def test_parse_errors(data: bytes, error: str) -> None:
    check(data, [E(error)])


def test_keyword_message_truncated_like_qemu() -> None:
    # parse_error() formats into a 1024-byte buffer
    check(b"[" + b"a" * 1005 + b"]", [E("invalid keyword '" + "a" * 1005 + "'")])
    check(b"[" + b"a" * 1006 + b"]", [E("invalid keyword '" + "a" * 1006)])
    check(b"[" + b"a" * 5000 + b"]", [E("invalid keyword '" + "a" * 1006)])


def test_junk_between_messages() -> None:
    check(b"{'a':1}junk{\"execute\":\"x\"}",
          [{"a": 1}, E("invalid keyword 'junk'"), {"execute": "x"}])
    check(b"x:1 ", [E("invalid keyword 'x'"), E("expecting value"), 1])


# ------------------------------------------------------------------ lexical errors


@pytest.mark.parametrize(("data", "expected"), [
    (b"{\x01", [stray("\x01")]),
    (b"{\xff", [stray("\ufffd")]),
    (b"\xfe", [stray("\ufffd")]),
    (b"%p", [stray("%")]),
    (b"%%", [stray("%")]),
    (b"\x01\x01", [stray("\x01"), stray("\x01")]),  # a control byte ends recovery, then errs again
    (b"\xff\xff", [stray("\ufffd"), stray("\ufffd")]),
    (b'"unterminated\x01', [stray('"unterminated\x01')]),
    (b"\x00", [stray("")]),  # printed with %s: a NUL ends the text
    (b'"abc\x00', [stray('"abc')]),
    (b"01", [stray("01")]),
    (b"-a", [stray("-a")]),
    (b"1.x", [stray("1.x")]),
    (b"1ex", [stray("1ex")]),
    (b"1e+x", [stray("1e+x")]),
    (b"- 1", [stray("- ")]),
    (b"+1", [stray("+")]),
    (b".5", [stray(".")]),
    (b"NaN", [stray("N")]),
    (b"[True]", [stray("T"), E("expecting value")]),
    (b'{"execute":"a\xffb"}', [stray('"a\ufffd'), E("expecting value")]),
    (b'{"execute":"a\tb"}', [stray('"a\t'), E("expecting value")]),
    (b'"\\\x01', [stray('"\\\x01')]),
    (b"'\\'\x01", [stray("'\\'\x01")]),
])
def test_stray(data: bytes, expected: list[Any]) -> None:
    check(data, expected)


@pytest.mark.parametrize(("data", "shown"), [
    (b'"\xc0\x80\x01', '"\x00\x01'),
    (b'"\xef\xbf\xbe\x01', '"\ufffd\x01'),
    (b'"\xc3\x01', '"\ufffd\x01'),
    (b'"\xf0\x9f\x98\x80\x01', '"\U0001f600\x01'),
    (b'"\xe0\x80\x01', '"\ufffd\x01'),
    (b'"\xed\xa0\x80\x01', '"\ufffd\x01'),
    (b'"\xf8\x88\x80\x80\x80\x01', '"\ufffd\x01'),  # one replacement for the whole sequence
    (b'"\x80\x80\x01', '"\ufffd\ufffd\x01'),
    (b'"\xe2\x82\x01', '"\ufffd\x01'),
    (b'"\x7f\x01', '"\x7f\x01'),
    (b'"\xf4\x90\x80\x80\x01', '"\ufffd\x01'),
    (b'"\xfe', '"\ufffd'),
])
def test_stray_rendering_follows_qemus_writer(data: bytes, shown: str) -> None:
    check(data, [stray(shown)])


@pytest.mark.parametrize(("junk", "between"), [
    (b"x\t", [E("invalid keyword 'x'")]),  # a tab is whitespace here, not an error
    (b"%\t", [stray("%")]),  # ... and does not end recovery
    (b"%\r", [stray("%")]),
    (b"%\n", [stray("%")]),
    (b'%"', [stray("%")]),  # a quote in recovery is skipped, not a string
    (b"%ab:", [stray("%"), E("expecting value")]),
    (b"%ab,", [stray("%"), E("expecting value")]),
    (b"%ab]", [stray("%"), E("expecting value")]),
    (b"%ab}", [stray("%"), E("expecting value")]),
    (b"%\xfe", [stray("%"), stray("\ufffd")]),
])
def test_recovery_points(junk: bytes, between: list[Any]) -> None:
    check(junk + b'{"id":1}', [*between, {"id": 1}])


def test_recovery_restarts_on_brace_after_skipping() -> None:
    check(b"%ab[1]", [stray("%"), [1]])


# ------------------------------------------------------------------ qmp-test.c test_malformed


@pytest.mark.parametrize("bad", [
    b"{]\n", b"{\xff", b"{\x01", b"{'bad \xff", b"{'execute': 'nonexistent', 'id':'\n", b"%p",
])
def test_malformed_then_recovered(bad: bytes) -> None:
    results = feed_all(bad + b"{ 'execute': 'no-such-cmd' }")
    assert len(results) == 2
    assert isinstance(results[0], JSONParseError)
    assert results[1] == {"execute": "no-such-cmd"}


def test_malformed_non_dicts_parse() -> None:
    check(b"null {} { 'execute': true } { 'execute': 'no-such-cmd', 'arguments': [] }",
          [None, {}, {"execute": True}, {"execute": "no-such-cmd", "arguments": []}])


# ------------------------------------------------------------------ limits


def nesting_depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


def test_nesting_limit() -> None:
    for chunk in (None, 1):
        for fast in (True, False):
            [deep] = feed_all(b"[" * MAX_NESTING + b"]" * MAX_NESTING, chunk, fast_path=fast)
            assert nesting_depth(deep) == MAX_NESTING
    too_deep = feed_all(b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1))
    # the error resets the counts; each "]" then closes nothing
    assert too_deep == [JSONParseError("JSON nesting depth limit exceeded")] + [E("expecting value")] * 1025
    mixed = b'{"a":' * 512 + b"[" * 512 + b"]" * 512 + b"}" * 512
    assert isinstance(feed_all(mixed)[0], dict)


def test_small_limits() -> None:
    size = JSONParseError("JSON token size limit exceeded")
    count = JSONParseError("JSON token count limit exceeded")
    nesting = JSONParseError("JSON nesting depth limit exceeded")
    # A token is refused when the message's earlier tokens plus this one, plus one, exceed
    # the limit.
    for fast in (True, False):
        kw = {"max_token_size": 10, "fast_path": fast}
        assert feed_all(b'["abcde"]', **kw) == [["abcde"]]  # "]": 1 + 7 + 1 + 1 = 10
        assert feed_all(b'["abcdef"]', **kw) == [size]  # "]": 11; the refused "]" is dropped
        assert feed_all(b'"abcdefg"', **kw) == ["abcdefg"]  # 9 + 1
        assert feed_all(b'"abcdefgh"', **kw) == [size]  # 10 + 1
        # The lexer gives up on a token once it is longer than the limit and starts afresh
        # with the next byte.
        assert feed_all(b'"abcdefghijkl" ', **kw) == [size, E("invalid keyword 'kl'")]
        assert feed_all(b"12345678901234 ", **kw) == [size, 234]
        kw = {"max_token_count": 4, "fast_path": fast}
        assert feed_all(b"[1,2]", **kw) == [count]
        assert feed_all(b"[1,2,3] ", **kw) == [count, 3, E("expecting value")]
        assert feed_all(b"[[]]", **kw) == [[[]]]
        kw = {"max_nesting": 3, "fast_path": fast}
        assert feed_all(b"[[[]]]", **kw) == [[[[]]]]
        assert feed_all(b"[[[[]]]]", **kw) == [nesting] + [E("expecting value")] * 4


def test_default_limits() -> None:
    assert (MAX_TOKEN_SIZE, MAX_TOKEN_COUNT, MAX_NESTING) == (64 << 20, 2 << 20, 1024)


@pytest.mark.slow
def test_real_token_size_limit() -> None:
    big = MAX_TOKEN_SIZE
    size = JSONParseError("JSON token size limit exceeded")
    assert feed_all(b'"' + b"a" * (big - 2) + b'"') == [size]
    streamer = JSONStreamer()
    out = []
    data = b'"' + b"a" * big + b'aa"\x01' + QUERY_STATUS
    for i in range(0, len(data), 1 << 20):
        out += streamer.feed(data[i:i + (1 << 20)])
    assert out == [size, E("invalid keyword 'aa'"), stray('"\x01'), {"execute": "query-status"}]


@pytest.mark.slow
def test_real_token_count_limit() -> None:
    n = MAX_TOKEN_COUNT
    assert feed_all(b"[" + b"1," * ((n - 2) // 2) + b"1]") == [
        JSONParseError("JSON token count limit exceeded")]


# ------------------------------------------------------------------ properties

_PIECES = [
    b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\t", b'"', b"'", b"\\", b"u", b"d83d", b"dc00",
    b"0", b"1", b"-", b".", b"e", b"+", b"a", b"true", b"null", b"X", b"%", b"\x00", b"\x01", b"\x7f",
    b"\xc3\xa9", b"\xc0\x80", b"\xff", b"\xfe", b"\xef\xbf\xbe", b"\xe2\x82", b'"id"', b'"k":', b"0e1",
    b"18446744073709551616", b'{"a":1}', b"[1,2]",
]
jsonish = st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join)
any_input = st.one_of(st.binary(max_size=120), jsonish)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_input, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_chunking_and_paths_do_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = strict(JSONStreamer().feed(data))
    for fast in (True, False):
        streamer = JSONStreamer(fast_path=fast)
        got: list[Any] = []
        for piece in chunked(data, cuts):
            got += streamer.feed(piece)
        assert strict(got) == whole


@settings(max_examples=300, deadline=None)
@given(junk=any_input, resync=st.sampled_from([b"\x01", b"\x1f", b"\xff", b"\x00"]))
def test_control_byte_resynchronises(junk: bytes, resync: bytes) -> None:
    for fast in (True, False):
        streamer = JSONStreamer(fast_path=fast)
        streamer.feed(junk)
        out = streamer.feed(resync + QUERY_STATUS)
        assert out[-1] == {"execute": "query-status"}
        assert isinstance(out[-2], JSONParseError)


_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12).filter(
    lambda s: not any(0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE for c in s))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(_text, json_values, max_size=5), ensure_ascii=st.booleans(),
       compact=st.booleans())
def test_valid_json_round_trips(value: dict[str, Any], ensure_ascii: bool, compact: bool) -> None:
    separators = (",", ":") if compact else (", ", ": ")
    data = json.dumps(value, ensure_ascii=ensure_ascii, separators=separators).encode()
    for fast in (True, False):
        assert strict(JSONStreamer(fast_path=fast).feed(data)) == strict([value])


@settings(max_examples=300, deadline=None)
@given(value=json_values, edits=st.lists(
    st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=3), st.sampled_from(_PIECES)),
    min_size=1, max_size=4))
def test_fast_path_agrees_on_nearly_valid_json(
    value: Any, edits: list[tuple[int, int, bytes]]
) -> None:
    # Valid messages with a few splices: the inputs the fast path sees and must either
    # decode exactly like the exact path or leave to it.
    data = bytearray(json.dumps({"execute": "x", "arguments": value}).encode())
    for where, drop, piece in edits:
        at = where % (len(data) + 1)
        data[at:at + drop] = piece
    stream = bytes(data) * 2
    assert strict(JSONStreamer().feed(stream)) == strict(JSONStreamer(fast_path=False).feed(stream))
