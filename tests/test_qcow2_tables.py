"""Table helpers and header details that the open path leans on for speed."""

from __future__ import annotations

import random

from blocklayer.qcow2.header import FEATURE_TABLE, Header, parse_header, serialize_header
from blocklayer.qcow2.tables import be_array_trimmed, used_length


def _slow_used_length(data: bytes) -> int:
    return len(data.rstrip(b"\0"))


def test_used_length_matches_stripping_trailing_zeroes() -> None:
    rng = random.Random(4)
    cases = [b"", b"\0", b"\1", bytes(64), bytes(64) + b"\1", b"\1" + bytes(64), bytes(1 << 20),
             b"\1" + bytes((1 << 16) - 1), bytes((1 << 16) - 1) + b"\1"]
    for _ in range(2000):
        size = rng.randrange(0, 200_000)
        data = bytearray(size)
        for _ in range(rng.randrange(0, 4)):
            if size:
                data[rng.randrange(0, size)] = rng.randrange(1, 256)
        cases.append(bytes(data))
    for data in cases:
        assert used_length(data) == _slow_used_length(data), len(data)


def test_trimmed_table_keeps_every_used_entry() -> None:
    table = bytes(8) + (0x30000).to_bytes(8, "big") + bytes(65536 - 16)
    assert list(be_array_trimmed(table)) == [0, 0x30000]
    assert list(be_array_trimmed(bytes(65536))) == []


def test_feature_table_parsed_as_written_every_time() -> None:
    hdr = Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16,
                 size=1 << 20, crypt_method=0, l1_size=1, l1_table_offset=3 << 16,
                 refcount_table_offset=1 << 16, refcount_table_clusters=1, nb_snapshots=0,
                 snapshots_offset=0, header_length=112)
    blob = serialize_header(hdr)
    first, second = parse_header(blob), parse_header(blob)
    assert first.feature_table == second.feature_table == list(FEATURE_TABLE)
    # Each header has its own list, whatever is shared behind it.
    first.feature_table.append((0, 9, "x"))
    assert parse_header(blob).feature_table == list(FEATURE_TABLE)
