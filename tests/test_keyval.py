"""QEMU's keyval syntax and -blockdev arguments (util/keyval.c, the keyval input visitor)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import qemu_tools

from qmp_server.errors import QMPError
from qmp_server.keyval import blockdev_options_from_cli, parse_json_option, parse_keyval
from qmp_server.schema import Schema


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


@pytest.mark.parametrize(
    ("text", "implied", "expected"),
    [
        ("a=1,b=two", None, {"a": "1", "b": "two"}),
        ("a.b.c=1,a.b.d=2,a.e=3", None, {"a": {"b": {"c": "1", "d": "2"}, "e": "3"}}),
        ("a.0=x,a.1=y", None, {"a": ["x", "y"]}),
        ("a.1.k=y,a.0.k=x", None, {"a": [{"k": "x"}, {"k": "y"}]}),
        ("a=x,,y,,,b=", None, {"a": "x,y,", "b": ""}),
        ("a=1,a=2", None, {"a": "2"}),
        ("a=1,", None, {"a": "1"}),
        ("", None, {}),
        ("qcow2,node-name=n", "driver", {"driver": "qcow2", "node-name": "n"}),
        ("driver=qcow2,node-name=n", "driver", {"driver": "qcow2", "node-name": "n"}),
        ("x-y_z=1,__com.redhat_k=2", None, {"x-y_z": "1", "__com.redhat_k": "2"}),
        ("a=b=c", None, {"a": "b=c"}),
    ],
)
def test_parse(text: str, implied: str | None, expected: dict[str, Any]) -> None:
    assert parse_keyval(text, implied) == expected


# (option argument, message). Each was given to QEMU 7.2 as '-blockdev ARG', which printed
# "qemu-system-x86_64: -blockdev ARG: MESSAGE" and exited 1.
BLOCKDEV_ERRORS: list[tuple[str, str]] = [
    # schema problems, keyval flavour
    ("driver=qcow2,node-name=x,file.driver=file", "Parameter 'file.filename' is missing"),
    ("driver=qcow2,node-name=x", "Parameter 'file' is missing"),
    ("driver=nosuchdrv", "Parameter 'driver' does not accept value 'nosuchdrv'"),
    ("node-name=n", "Parameter 'driver' is missing"),
    ("driver=null-co,,node-name=n", "Parameter 'driver' does not accept value 'null-co,node-name=n'"),
    ("driver=null-co,node-name=n,size=abc", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=n,size=1.5", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=n,size=1k", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=n,size=", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=n,size=5 ", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=n,size=9223372036854775808", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=n,latency-ns=abc", "Parameter 'latency-ns' expects integer"),
    ("driver=null-co,node-name=n,latency-ns=18446744073709551616", "Parameter 'latency-ns' expects integer"),
    ("driver=null-co,node-name=n,latency-ns=0x", "Parameter 'latency-ns' expects integer"),
    ("driver=null-co,node-name=n,read-zeroes=maybe", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("driver=null-co,node-name=n,read-zeroes=", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("driver=null-co,node-name=n,read-zeroes=ON", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("driver=null-co,node-name=n,cache.direct=maybe", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("driver=null-co,node-name=n,bogus=1", "Parameter 'bogus' is unexpected"),
    ("driver=null-co,node-name=n,__com.redhat_a=1", "Parameter '__com.redhat_a' is unexpected"),
    ("driver=null-co,node-name=n,a_b-c=1", "Parameter 'a_b-c' is unexpected"),
    ("driver=null-co,node-name=n,cache.direct=on,cache.x=1", "Parameter 'cache.x' is unexpected"),
    ("driver=null-co,node-name=n,cache=on", "Invalid parameter type for 'cache', expected: object"),
    ("driver=null-co,node-name=n,size.x=1", "Parameters 'size.*' are unexpected"),
    ("driver=null-co,node-name=n,driver=raw", "Parameter 'file' is missing"),
    ("driver=raw,node-name=r,file.driver=null-co,file.size=x", "Parameter 'file.size' expects integer"),
    ("driver=raw,node-name=r,file.driver=null-co,file.size.q=x", "Parameters 'file.size.*' are unexpected"),
    (
        "driver=qcow2,node-name=r,file=f,overlap-check=bad",
        "Parameter 'overlap-check' does not accept value 'bad'",
    ),
    (
        "driver=qcow2,node-name=r,file=f,overlap-check.template=bad",
        "Parameter 'template' does not accept value 'bad'",
    ),
    ("driver=null-co,node-name=n,a.0=x,a.1=y", "Parameter 'a' is unexpected"),
    ("driver=null-co,node-name=n,a.b.c=1", "Parameter 'a' is unexpected"),
    # keyval syntax
    ("=driver", "Invalid parameter ''"),
    (",driver=null-co", "Invalid parameter ''"),
    ("null-co,,x,node-name=n", "Invalid parameter ''"),
    ("driver=null-co,node-name=n,a..b=1", "Invalid parameter 'a..b'"),
    ("driver=null-co,node-name=n,.a=1", "Invalid parameter '.a'"),
    ("driver=null-co,node-name=n,a.=1", "Invalid parameter 'a.'"),
    ("driver=null-co,node-name=n,1=x", "Invalid parameter '1'"),
    ("driver=null-co,node-name=n,a.0x=1", "Invalid parameter 'a.0x'"),
    ("driver=null-co,node-name=n,_a=1", "Invalid parameter '_a'"),
    ("driver=null-co,node-name=n,@=x", "Invalid parameter '@'"),
    ("driver=null-co,node-name=n,key", "Expected '=' after parameter 'key'"),
    ("driver=null-co,node-name=n," + "a" * 128 + "=1", "Parameter '" + "a" * 128 + "' is too long"),
    (
        "driver=null-co,node-name=n,b." + "a" * 128 + "=1",
        "Parameter fragment '" + "a" * 128 + "' is too long",
    ),
    ("help", "Help is not available for this option"),
    ("driver=null-co,help", "Help is not available for this option"),
    ("driver=null-co,?", "Help is not available for this option"),
    ("driver=null-co,node-name=n,cache.direct=on,cache=x", "Parameters 'cache.*' used inconsistently"),
    ("driver=null-co,node-name=n,cache=x,cache.direct=on", "Parameters 'cache.*' used inconsistently"),
    ("driver=null-co,node-name=n,a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
    ("driver=null-co,node-name=n,a.b=1,a=2", "Parameters 'a.*' used inconsistently"),
    ("driver=null-co,node-name=n,a.0=x,a.b=y", "Parameters 'a.*' used inconsistently"),
    ("driver=null-co,node-name=n,a.1=x,a.b=y", "Parameters 'a.*' used inconsistently"),
    (
        "driver=qcow2,node-name=r,file=f,overlap-check=none,overlap-check.template=all",
        "Parameters 'overlap-check.*' used inconsistently",
    ),
    ("driver=null-co,node-name=n,a.1=x", "Parameter 'a.0' missing"),
    ("driver=null-co,node-name=n,a.0=x,a.2=y", "Parameter 'a.1' missing"),
    ("driver=null-co,node-name=n,a.01=x,a.1=y", "Parameter 'a.0' missing"),
    # which incomplete list is reported first follows QEMU's QDict hash order
    ("node-name=n,x1.1=v,m.2=v,b.1=v,driver=null-co", "Parameter 'x1.0' missing"),
    ("foo.1=v,a.2=v,drv.1=v,node-name=n,driver=null-co", "Parameter 'a.0' missing"),
    ("foo.2=v,node-name=n,bar.2=v,driver=null-co,drv.2=v", "Parameter 'bar.0' missing"),
    ("b.1=v,m.1=v,driver=null-co,k_l.1=v,node-name=n", "Parameter 'k_l.0' missing"),
    ("foo.1=v,node-name=n,x1.1=v,driver=null-co,c.1=v", "Parameter 'x1.0' missing"),
    # JSON
    ('{"driver":"null-co"', "JSON parse error, premature EOI"),
    ("{", "JSON parse error, premature EOI"),
    ('{"driver":}', "JSON parse error, expecting value"),
    ('{"driver":"null-co",}', "JSON parse error, expecting value"),
    ('{"a":{"b":}}', "JSON parse error, expecting value"),
    ('{"driver":"null-co","node-name":"n"} x', "Expecting at most one JSON value"),
    ('{"driver":"null-co","node-name":"n"} {}', "Expecting at most one JSON value"),
    ('{"driver":"null-co","node-name":"n"}}', "Expecting at most one JSON value"),
    ('{"driver":"null-co","node-name":"n"}]', "Expecting at most one JSON value"),
    ("{}[]", "Expecting at most one JSON value"),
    ('{"driver" "null-co"}', "JSON parse error, missing : in object pair"),
    ('{"driver":"null-co" "node-name":"n"}', "JSON parse error, expected separator in dict"),
    ('{"driver":"null-co","node-name":"n","x":[1,2}', "JSON parse error, expected separator in list"),
    ('{"driver":"null-co","node-name":"n","x":[1 2]}', "JSON parse error, expected separator in list"),
    ('{5:"x"}', "JSON parse error, key is not a string in object"),
    ('{"driver":"null-co","driver":"raw"}', "JSON parse error, duplicate key"),
    ('{"driver":"null-co","node-name":"n","x":tru}', "JSON parse error, invalid keyword 'tru'"),
    ('{"driver":@}', "JSON parse error, stray '@'"),
    ('{"driver":"null-co","node-name":"n","x":%d}', "JSON parse error, stray '%'"),
    ('{"driver":"null-co","node-name":"n","read-zeroes":True}', "JSON parse error, stray 'T'"),
    ('{"driver":"null-co","node-name":"n","x":01}', "JSON parse error, stray '01'"),
    ('{"driver":"null-co","node-name":"n","x":-}', "JSON parse error, stray '-}'"),
    ('{"driver":"null-co","node-name":"n","x":1.}', "JSON parse error, stray '1.}'"),
    ('{"driver":"null-co","node-name":"n","x":"abc', "JSON parse error, stray '\"abc'"),
    ('{"driver":"null-co","node-name":"n","x":"\\q"}', "JSON parse error, invalid escape sequence in string"),
    (
        '{"driver":"null-co","node-name":"n","x":"\\ud800"}',
        "JSON parse error, \\ud800 is not a valid Unicode character",
    ),
    ("{}", "Parameter 'driver' is missing"),
    ('{"driver":"null-co","node-name":"n","bogus":1}', "Parameter 'bogus' is unexpected"),
    ('{"driver":"null-co","node-name":"n","x":"\\u00e9"}', "Parameter 'x' is unexpected"),
    ('{"driver":"null-co","node-name":"n","x":"a\\\'b"}', "Parameter 'x' is unexpected"),
    (
        '{"driver":"null-co","node-name":"n","size":1e3}',
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        '{"driver":"null-co","node-name":"n","size":1e400}',
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        '{"driver":"null-co","node-name":"n","size":"1"}',
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        '{"driver":"null-co","node-name":"n","read-zeroes":"on"}',
        "Invalid parameter type for 'read-zeroes', expected: boolean",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BLOCKDEV_ERRORS)
def test_blockdev_errors(schema: Schema, text: str, expected: str) -> None:
    with pytest.raises(QMPError) as caught:
        blockdev_options_from_cli(schema, text)
    assert caught.value.desc == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # conversions QEMU 7.2 accepted (sizes read back with query-named-block-nodes)
        ("null-co,node-name=n", {"driver": "null-co", "node-name": "n"}),
        ("driver=null-co,node-name=n,size=0x2000,", {"driver": "null-co", "node-name": "n", "size": 8192}),
        ("driver=null-co,node-name=n,size=01000", {"driver": "null-co", "node-name": "n", "size": 512}),
        ("driver=null-co,node-name=n,size= 4096", {"driver": "null-co", "node-name": "n", "size": 4096}),
        ("driver=null-co,node-name=n,size=+8192", {"driver": "null-co", "node-name": "n", "size": 8192}),
        ("driver=null-co,node-name=n,size=-0", {"driver": "null-co", "node-name": "n", "size": 0}),
        (
            "driver=null-co,node-name=n,latency-ns=-5",
            {"driver": "null-co", "node-name": "n", "latency-ns": 2**64 - 5},
        ),
        ("driver=null-co,node-name=n,,x", {"driver": "null-co", "node-name": "n,x"}),
        ("driver=null-co,node-name=n,,,", {"driver": "null-co", "node-name": "n,"}),
        ("{'driver':'null-co','node-name':'n'}", {"driver": "null-co", "node-name": "n"}),
        ('{ "driver" : "null-co" , "node-name" : "n" }', {"driver": "null-co", "node-name": "n"}),
        (
            "driver=qcow2,node-name=q,file.driver=file,file.filename=/a,file.cache.direct=on,backing=,"
            "overlap-check.template=all,lazy-refcounts=off",
            {
                "driver": "qcow2",
                "node-name": "q",
                "file": {"driver": "file", "filename": "/a", "cache": {"direct": True}},
                "backing": "",
                "overlap-check": {"template": "all"},
                "lazy-refcounts": False,
            },
        ),
        (
            "raw,node-name=r,file=f,active=off",
            {"driver": "raw", "node-name": "r", "file": "f", "active": False},
        ),
    ],
)
def test_blockdev_conversions(schema: Schema, text: str, expected: dict[str, Any]) -> None:
    assert blockdev_options_from_cli(schema, text) == expected


@pytest.mark.parametrize("word", ["on", "yes", "true", "y", "off", "no", "false", "n"])
def test_keyval_booleans(schema: Schema, word: str) -> None:
    options = blockdev_options_from_cli(schema, f"driver=null-co,node-name=n,read-zeroes={word}")
    assert options["read-zeroes"] is (word in ("on", "yes", "true", "y"))


def test_json_numbers() -> None:
    """Integers beyond uint64 become doubles, as in QEMU's parser."""
    assert parse_json_option('{"a": 18446744073709551615, "b": -9223372036854775808}') == {
        "a": 18446744073709551615,
        "b": -9223372036854775808,
    }
    parsed = parse_json_option('{"a": 18446744073709551616, "b": -9223372036854775809, "c": 1.5e2}')
    assert parsed == {"a": 18446744073709551616.0, "b": -9223372036854775809.0, "c": 150.0}
    assert all(isinstance(value, float) for value in parsed.values())


@pytest.mark.qemu
def test_blockdev_errors_against_real_qemu() -> None:
    """QEMU (7.2 here) still prints each BLOCKDEV_ERRORS message for its argument."""
    binary = qemu_tools.require("qemu-system-x86_64")
    for text, expected in BLOCKDEV_ERRORS:
        result = subprocess.run(
            [binary, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-blockdev", text],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 1, text
        prefix = f"qemu-system-x86_64: -blockdev {text}: "
        lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
        assert lines and lines[0][len(prefix) :] == expected, (text, result.stderr)


@pytest.mark.parametrize(("text", "outcome"), [
    # Only the end of the input ends these tokens (json_lexer_flush feeds a NUL).
    ("123", 123), ("-1.5", -1.5), ("true", True), ("'x'", "x"),
    ("tru", "JSON parse error, invalid keyword 'tru'"),
    ('"abc', "JSON parse error, stray '\"abc'"),
    ("[1, 2", "JSON parse error, premature EOI"),
    ("[1 2", "JSON parse error, expected separator in list"),
    ("", "Expecting a JSON value"),
    ("1 2", "Expecting at most one JSON value"),
])
def test_json_option_at_end_of_input(text: str, outcome: object) -> None:
    if isinstance(outcome, str) and (outcome.startswith(("JSON", "Expecting"))):
        with pytest.raises(QMPError) as info:
            parse_json_option(text)
        assert info.value.desc == outcome
    else:
        assert parse_json_option(text) == outcome
