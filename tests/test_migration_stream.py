"""The migration stream format, URIs, options and block-configuration checks, without processes."""

from __future__ import annotations

import json
import struct

import pytest
import trio
import trio.testing
from schema_conformance import Conformance

from qmp_server.errors import QMPError
from qmp_server.migration import testhook
from qmp_server.migration.blockconfig import NodeDescription, compare
from qmp_server.migration.options import CAPABILITIES, PARAMETER_DEFAULTS, MigrationOptions
from qmp_server.migration.state import Incoming, MigrationStatus, Outgoing
from qmp_server.migration.stream import (
    MAGIC,
    VERSION,
    Channel,
    Decoder,
    Frame,
    FrameKind,
    Header,
    PeerFailed,
    StreamClosed,
    StreamError,
    encode_frame,
    encode_header,
)
from qmp_server.migration.uri import (
    ExecAddress,
    FdAddress,
    FileAddress,
    InetAddress,
    UnixAddress,
    parse_uri,
)
from qmp_server.schema import Schema


def decode_all(data: bytes, *, eof: bool = False, chunk: int = 1) -> list[Header | Frame]:
    decoder = Decoder()
    items: list[Header | Frame] = []
    for i in range(0, len(data), chunk):
        decoder.feed(data[i:i + chunk])
        while (item := decoder.next()) is not None:
            items.append(item)
    if eof:
        decoder.feed(b"")
        while True:
            item = decoder.next()
            assert item is not None
            items.append(item)
    return items


# Stream format ---------------------------------------------------------------------------


def test_header_layout_is_frozen() -> None:
    assert encode_header() == b"QMPSMIG\n\x00\x01"
    assert MAGIC == b"QMPSMIG\n" and VERSION == 1


def test_frame_layout() -> None:
    frame = encode_frame(FrameKind.FAIL, {"error": "boom"})
    body = json.dumps({"error": "boom"}, separators=(",", ":")).encode()
    assert frame == b"F" + struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_roundtrip_byte_by_byte(chunk: int) -> None:
    nodes = [{"node-name": "disk0", "driver": "qcow2", "filename": "/x", "virtual-size": 1 << 26}]
    data = (encode_header() + encode_frame(FrameKind.CONFIG, {"nodes": nodes})
            + encode_frame(FrameKind.GLOBAL, {"runstate": "running", "running": True})
            + encode_frame(FrameKind.END))
    assert decode_all(data, chunk=chunk) == [
        Header(1),
        Frame(FrameKind.CONFIG, {"nodes": nodes}),
        Frame(FrameKind.GLOBAL, {"runstate": "running", "running": True}),
        Frame(FrameKind.END, {}),
    ]


def test_bad_magic_is_reported_on_the_first_wrong_byte() -> None:
    decoder = Decoder()
    decoder.feed(b"QEVM")  # a QEMU migration stream
    with pytest.raises(StreamError, match=r"^Not a qmp-server migration stream \(bad magic\)$"):
        decoder.next()


def test_other_version_is_decoded_for_the_caller_to_refuse() -> None:
    assert decode_all(MAGIC + b"\x00\x07") == [Header(7)]


@pytest.mark.parametrize("cut", [3, 9, 11, 14])
def test_truncated_stream(cut: int) -> None:
    data = (encode_header() + encode_frame(FrameKind.END))[:cut]
    with pytest.raises(StreamError, match=r"^Migration stream truncated$"):
        decode_all(data, eof=True)


def test_clean_close_between_frames() -> None:
    with pytest.raises(StreamClosed):
        decode_all(encode_header() + encode_frame(FrameKind.END), eof=True)


@pytest.mark.parametrize(("raw", "message"), [
    (b"Z" + struct.pack(">I", 2) + b"{}", "unknown frame type"),
    (b"C" + struct.pack(">I", 1 << 30), "frame of 1073741824 bytes"),
    (b"C" + struct.pack(">I", 2) + b"[]", "bad 'C' frame"),
    (b"C" + struct.pack(">I", 3) + b"{\xff}", "bad 'C' frame"),
])
def test_corrupt_frames(raw: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        decode_all(encode_header() + raw)


async def test_channel_over_a_memory_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    a, b = Channel(left), Channel(right)
    await a.send(encode_header(), encode_frame(FrameKind.CONFIG, {"nodes": []}))
    assert await b.receive_header() == 1
    assert (await b.receive(FrameKind.CONFIG)).payload == {"nodes": []}
    await a.send(encode_frame(FrameKind.FAIL, {"error": "nope"}))
    with pytest.raises(PeerFailed, match=r"^nope$"):
        await b.receive(FrameKind.END)
    await a.send(encode_frame(FrameKind.ACK))
    with pytest.raises(StreamError, match="expected a 'E' frame, got 'K'"):
        await b.receive(FrameKind.END)
    await a.aclose()
    with pytest.raises(StreamClosed):
        await b.receive(FrameKind.END)
    assert a.bytes_sent == b.bytes_received


# URIs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "address"), [
    ("unix:/tmp/x.sock", UnixAddress("/tmp/x.sock")),
    ("tcp:127.0.0.1:4444", InetAddress("127.0.0.1", "4444")),
    ("tcp:localhost:4444,ipv4", InetAddress("localhost", "4444")),
    ("tcp:[::1]:4444", InetAddress("::1", "4444")),
    ("tcp::4444", InetAddress("", "4444")),
    ("exec:cat > x", ExecAddress("cat > x")),
    ("file:/a,b", FileAddress("/a,b")),
    ("file:/a,offset=2M", FileAddress("/a", 2 << 20)),
    ("fd:mig", FdAddress("mig")),
])
def test_parse_uri(uri: str, address: object) -> None:
    assert parse_uri(uri) == address


@pytest.mark.parametrize(("uri", "error"), [
    # QEMU 7.2 gives these texts too (checked by experiment).
    ("unix:", "invalid Unix socket address"),
    ("tcp:foo", "error parsing address 'foo'"),
    ("tcp:[::1]", "error parsing IPv6 address '[::1]'"),
    ("tcp::", "error parsing port in address ':'"),
    ("bogus:x", "unknown migration protocol: bogus:x"),
    ("rdma:host:4444", "migration transport 'rdma' is not supported by qmp-server "
                       "(use 'unix:', 'tcp:', 'exec:', 'file:' or 'fd:')"),
    ("file:x,offset=-1", "file URI has bad offset -1"),
])
def test_parse_uri_errors(uri: str, error: str) -> None:
    with pytest.raises(QMPError) as info:
        parse_uri(uri)
    assert info.value.desc == error


# Options ---------------------------------------------------------------------------------


def test_capabilities_default_off_and_events_switch() -> None:
    options = MigrationOptions()
    assert [c["capability"] for c in options.query_capabilities()] == list(CAPABILITIES)
    assert not any(c["state"] for c in options.query_capabilities())
    options.set_capabilities([{"capability": "events", "state": True},
                              {"capability": "late-block-activate", "state": True}])
    assert options.events
    assert {c["capability"] for c in options.query_capabilities() if c["state"]} == {
        "events", "late-block-activate"}


@pytest.mark.parametrize(("caps", "error"), [
    (["postcopy-preempt"], "Postcopy preempt requires postcopy-ram"),
    (["switchover-ack"], "Capability 'switchover-ack' requires capability 'return-path'"),
    (["multifd", "xbzrle"], "Multifd is not compatible with xbzrle"),
])
def test_capability_dependencies_are_all_or_nothing(caps: list[str], error: str) -> None:
    options = MigrationOptions()
    with pytest.raises(QMPError) as info:
        options.set_capabilities([{"capability": c, "state": True} for c in caps] +
                                 [{"capability": "events", "state": True}])
    assert info.value.desc == error
    assert not options.events


@pytest.mark.parametrize(("change", "error"), [
    # Texts as QEMU 7.2 answers them (checked by experiment).
    ({"downtime-limit": 3000000},
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ({"max-cpu-throttle": 5},
     "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ({"cpu-throttle-initial": 0},
     "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"xbzrle-cache-size": 1000},
     "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ({"multifd-channels": 0}, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ({"announce-step": 0}, "Parameter 'announce_step' expects a value between 0 and 10000"),
])
def test_parameter_checks(change: dict[str, int], error: str) -> None:
    options = MigrationOptions()
    with pytest.raises(QMPError) as info:
        options.set_parameters(change)
    assert info.value.desc == error
    assert options.query_parameters() == PARAMETER_DEFAULTS


def test_parameters_are_reported_back() -> None:
    options = MigrationOptions()
    options.set_parameters({"downtime-limit": 100, "tls-creds": None, "max-bandwidth": 1 << 20})
    params = options.query_parameters()
    assert params["downtime-limit"] == 100 and params["tls-creds"] == ""
    assert params["max-bandwidth"] == 1 << 20


# query-migrate shapes --------------------------------------------------------------------


def test_query_migrate_shapes_per_state() -> None:
    out = Outgoing(started=10.0)
    assert out.info(now=10.0) == {}
    out.status = MigrationStatus.SETUP
    assert out.info(now=10.5) == {"status": "setup"}
    out.status, out.active_at = MigrationStatus.ACTIVE, 10.002
    info = out.info(now=10.5)
    assert (info["status"], info["setup-time"], info["total-time"], info["expected-downtime"]) == (
        "active", 2, 500, 0)
    assert "downtime" not in info and info["ram"]["total"] == 0
    out.status, out.stopped_at, out.finished_at = MigrationStatus.COMPLETED, 10.010, 10.013
    info = out.info(now=99.0)
    assert (info["total-time"], info["downtime"], info["setup-time"]) == (13, 3, 2)
    assert "expected-downtime" not in info
    out.status, out.error = MigrationStatus.FAILED, "Failed to connect to '/x': No such file or directory"
    assert out.info() == {"status": "failed", "error-desc": out.error}

    inc = Incoming(status=MigrationStatus.SETUP, socket_addresses=[{"path": "/m", "type": "unix"}])
    assert inc.info() == {"socket-address": [{"path": "/m", "type": "unix"}], "status": "setup"}


# Block configuration ---------------------------------------------------------------------


def test_block_configuration_comparison() -> None:
    disk = NodeDescription("disk0", "qcow2", "/img/a.qcow2", 64 << 20)
    file = NodeDescription("disk0-file", "file", "/img/a.qcow2", None)
    assert compare([disk, file], [file, disk]) is None
    assert NodeDescription.from_wire(disk.to_wire()) == disk
    # Node names may differ (iotest 300); nodes only the destination has are its own.
    renamed = NodeDescription("disk1", "qcow2", "/img/a.qcow2", 64 << 20)
    null = NodeDescription("node-src", "null-co", "null-co://", 1 << 30)
    assert compare([disk, file], [renamed]) is None
    assert compare([null], [NodeDescription("node-dst", "null-co", "null-co://", 1 << 30)]) is None
    assert compare([disk], [disk, file, null]) is None
    # null-co with options has no exact file name: nothing to compare (iotest 300).
    assert compare([null], [NodeDescription("node-src", "null-co", "", 1 << 30)]) is None
    cases = [
        ([disk], [], "node 'disk0' of the source opens '/img/a.qcow2', which no node of the "
                     "destination opens"),
        ([disk, file], [NodeDescription("disk1", "qcow2", "/img/b.qcow2", 64 << 20)],
         "node 'disk0' of the source opens '/img/a.qcow2', which no node of the destination opens"),
        ([disk], [NodeDescription("disk0", "raw", "/img/a.qcow2", 64 << 20)],
         "node 'disk0' uses driver 'qcow2' on the source but 'raw' on the destination"),
        ([disk], [NodeDescription("disk0", "qcow2", "/img/b.qcow2", 64 << 20)],
         "node 'disk0' opens '/img/a.qcow2' on the source but '/img/b.qcow2' on the destination"),
        ([disk], [NodeDescription("disk0", "qcow2", "/img/a.qcow2", 32 << 20)],
         "node 'disk0' has virtual size 67108864 on the source but 33554432 on the destination"),
    ]
    for source, local, text in cases:
        assert compare(source, local) == "Block configuration mismatch: " + text


# Test hook -------------------------------------------------------------------------------


def test_delay_hook_parsing() -> None:
    assert testhook.parse("device=0.5, inactivated=1") == {"device": 0.5, "inactivated": 1.0}
    with pytest.raises(ValueError, match="PHASE=SECONDS"):
        testhook.parse("nowhere=1")


def test_replies_match_the_schema() -> None:
    schema = Conformance(Schema.load())
    out = Outgoing(started=1.0, status=MigrationStatus.ACTIVE, active_at=1.001)
    schema.check_return("query-migrate", out.info(now=2.0))
    out.status, out.stopped_at, out.finished_at = MigrationStatus.COMPLETED, 1.5, 1.6
    schema.check_return("query-migrate", out.info())
    out.status, out.error = MigrationStatus.FAILED, "boom"
    schema.check_return("query-migrate", out.info())
    inc = Incoming(status=MigrationStatus.SETUP, socket_addresses=[
        InetAddress("127.0.0.1", "4444").socket_address(), UnixAddress("/m").socket_address()])
    schema.check_return("query-migrate", inc.info())
    options = MigrationOptions()
    schema.check_return("query-migrate-capabilities", options.query_capabilities())
    schema.check_return("query-migrate-parameters", options.query_parameters())
    schema.check_event("MIGRATION", {"status": "device"})
