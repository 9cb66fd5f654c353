"""HMP's migration commands (issue 11 §4), against QEMU where its text did not change.

QEMU 7.2 answers the argument and error texts as 10.1 does; ``info migrate`` was
rewritten in 10.1 (``Status:``/``Time (ms):`` lines), which we follow, so its text is
checked against 10.1's layout and its content against QMP's ``query-migrate``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from migration_support import Server, blockdev, is_writer, qemu_img_create, start_server
from qemu_tools import require

from qmp_server.hmp.migration import ENUM_PARAMETERS, size_to_str

SAME_AS_QEMU = [
    "migrate_set_capability bogus on",
    "migrate_set_capability events maybe",
    "migrate_set_capability events",
    "migrate_set_capability events on",
    "migrate_set_parameter bogus 1",
    "migrate_set_parameter downtime-limit abc",
    "migrate_set_parameter downtime-limit 300",
    "migrate_set_parameter max-bandwidth 4k",
    "migrate_set_parameter max_bandwidth 4k",
    "migrate_set_parameter multifd-channels 0",
    "migrate_incoming unix:/nonexistent/x",
    "migrate",
    "migrate -x unix:/x",
    "migrate unix:/x extra",
    "migrate_cancel",
]


def test_argument_and_error_texts_match_qemu(tmp_path: Path) -> None:
    require("qemu-system-x86_64")
    ours = start_server([], tmp_path, "ours")
    qemu = start_server([], tmp_path, "qemu", qemu=True)
    try:
        for line in SAME_AS_QEMU:
            assert ours.hmp(line) == qemu.hmp(line), line
        for name in ("downtime-limit", "max-bandwidth"):
            assert (ours.cmd("query-migrate-parameters")[name]
                    == qemu.cmd("query-migrate-parameters")[name] == {"downtime-limit": 300,
                                                                      "max-bandwidth": 4096}[name])
        events = {c["capability"]: c["state"] for c in ours.cmd("query-migrate-capabilities")}
        assert events["events"] is True
    finally:
        ours.close()
        qemu.close()


#: Values read as QEMU 7.2's hmp_migrate_set_parameter reads each parameter's type: the
#: bandwidths in MiB by default ("Invalid size"), uint8/uint32 (C integers, base 0, "-1"
#: wraps), sizes (out of range apart), enums, the mapping only over QMP. Then QMP's checks.
SET_PARAMETER_LINES = [f"migrate_set_parameter {name} {value}" for name, values in {
    "max-bandwidth": ["-1", "1Q", "99999999999999999999", "abc", "8E", "16E",
                      "9223372036854775807", "9223372036854775808b", "1", "1.5k", "0x10"],
    "multifd-channels": ["256", "abc", "1k", "-1", "08", "18446744073709551616", "0x10", "010"],
    "downtime-limit": ["-5", "1.5", "16E", "99999999999999999999", "18446744073709551615",
                       "2000000"],
    "xbzrle-cache-size": ["1Q", "9223372036854775808", "8E", "16E", "8k"],
    "announce-initial": ["foo", "-1", "100001", "60"],
    "x-checkpoint-delay": ["4294967296", "-1", "1k", "4294967295"],
    "throttle-trigger-threshold": ["300", "0", "70"],
    "max-postcopy-bandwidth": ["-3", "1k"],
    "cpu-throttle-tailslow": ["maybe", "yes"],
    "multifd-compression": ["foo", "zlib"],
    "block-bitmap-mapping": ["x"],
}.items() for value in values]

#: Parameters only one of QEMU 7.2 and this server (QEMU 10.x's set) has.
_ONLY_7_2 = {"compress-level", "compress-threads", "compress-wait-thread",
             "decompress-threads", "block-incremental"}
_ONLY_10 = {"avail-switchover-bandwidth", "zero-page-detection", "x-vcpu-dirty-limit-period",
            "vcpu-dirty-limit", "mode", "direct-io"}


def _common_lines(text: str, leave_out: set[str]) -> list[str]:
    return [line for line in text.split("\r\n") if line.split(":")[0] not in leave_out]


def test_set_parameter_reads_values_as_qemu(tmp_path: Path) -> None:
    """Each line's text and the values it leaves (query-migrate-parameters, HMP's info
    migrate_parameters) as QEMU 7.2's, but for the parameters only one of us has."""
    require("qemu-system-x86_64")
    ours = start_server([], tmp_path, "ours")
    qemu = start_server([], tmp_path, "qemu", qemu=True)
    try:
        for line in SET_PARAMETER_LINES:
            assert ours.hmp(line) == qemu.hmp(line), line
        mine = ours.cmd("query-migrate-parameters")
        theirs = qemu.cmd("query-migrate-parameters")
        assert {k: v for k, v in mine.items() if k in theirs} == \
            {k: v for k, v in theirs.items() if k in mine}
        assert mine["max-bandwidth"] == 16 << 20 and mine["multifd-channels"] == 8  # 0x10 MiB, 010
        shown = ours.hmp("info migrate_parameters")
        assert _common_lines(shown, _ONLY_10) == \
            _common_lines(qemu.hmp("info migrate_parameters"), _ONLY_7_2)
        assert "avail-switchover-bandwidth: 0 bytes/second\r\n" in shown
        assert "multifd-zlib-level" not in shown
    finally:
        ours.close()
        qemu.close()


def test_enum_parameters_are_the_schemas() -> None:
    # HMP reads the enum parameters with its own table; it must be the schema's.
    types = json.loads((Path(__file__).parent.parent / "schema" / "types.json").read_text())
    defs = types.get("$defs", types)
    assert ENUM_PARAMETERS == {
        "multifd-compression": tuple(defs["MultiFDCompression"]["enum"]),
        "mode": tuple(defs["MigMode"]["enum"]),
        "zero-page-detection": tuple(defs["ZeroPageDetection"]["enum"]),
    }


def _poll(server: Server, line: str, wanted: str, timeout: float = 20.0) -> str:
    # iotests' _send_qemu_cmd with qemu_cmd_repeat: ask again until the text shows up.
    deadline = time.monotonic() + timeout
    while wanted not in (text := server.hmp(line)):
        assert time.monotonic() < deadline, f"{line!r} never showed {wanted!r}: {text!r}"
        time.sleep(0.05)
    return text


def test_iotest_091_flow_over_hmp(tmp_path: Path) -> None:
    # 091: the destination reads a FIFO from its start; the source migrates into it over
    # HMP and polls `info migrate` for "completed"; the destination then runs.
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = start_server(blockdev(image), tmp_path, "src")
    dst = start_server([*blockdev(image), "-incoming", f"exec: cat '{fifo}'"], tmp_path, "dst")
    try:
        assert src.qemu_io('disk0 "write -P 0x42 0 64k"').startswith("wrote 65536/65536")
        assert src.hmp(f'migrate "exec: cat > \'{fifo}\'"') == ""
        text = _poll(src, "info migrate", "completed")
        info = src.cmd("query-migrate")
        assert text.startswith("Status: \t\tcompleted\r\nTime (ms): \t\t"
                               f"total={info['total-time']}, setup={info['setup-time']}, "
                               f"down={info['downtime']}\r\nRAM info:\r\n")
        assert "  Sizes: \t\tpagesize=4 KiB, total=0 B\r\n" in text
        assert _poll(dst, "info status", "running") == "VM status: running\r\n"
        assert "read 65536/65536" in dst.qemu_io('disk0 "read -P 0x42 0 64k"')
        assert src.hmp("info status") == "VM status: paused (postmigrate)\r\n"
    finally:
        src.close()
        dst.close()


def test_migrate_without_d_returns_when_it_is_over(tmp_path: Path) -> None:
    src = start_server([], tmp_path, "src")
    try:
        assert src.hmp(f"migrate exec:cat>{shlex.quote(str(tmp_path / 's'))}") == ""
        assert src.cmd("query-migrate")["status"] == "completed"
        assert src.hmp("migrate exec:true") == (
            "Error: Can't migrate the vm that was paused due to previous migration\r\n")
        failed = start_server([], tmp_path, "other")
        try:
            target = tmp_path / "no" / "dir"
            assert failed.hmp(f"migrate -d file:{target}") == (
                f"Error: Unable to open {target}: No such file or directory\r\n")
            assert failed.hmp("info migrate") == (
                f"Status: \t\tfailed (Unable to open {target}: No such file or directory)\r\n")
        finally:
            failed.close()
    finally:
        src.close()


def test_incoming_deferred_over_hmp_shows_its_socket(tmp_path: Path) -> None:
    dst = start_server(["-incoming", "defer"], tmp_path, "dst")
    try:
        sock = tmp_path / "mig.sock"
        assert dst.hmp(f"migrate_incoming unix:{sock}") == ""
        assert dst.hmp("info migrate") == f"Status: \t\tsetup\r\nSockets: [\r\n\tunix:{sock}\r\n]\r\n"
        assert dst.hmp(f"migrate_incoming unix:{sock}") == (
            "Error: The incoming migration has already been started\r\n")
    finally:
        dst.close()


@pytest.mark.parametrize("value", [0, 512, 4096, 1_023_488, 1_024_000, 1_048_064, 1 << 20,
                                   1_500_000_000 // 512 * 512, 4_316_000_256])
def test_size_to_str_as_qemu(tmp_path: Path, value: int) -> None:
    # qemu-img info prints a virtual size with QEMU's size_to_str: the oracle.
    require("qemu-img")
    image = tmp_path / "sized.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), str(value)], check=True)
    info = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True,
                          check=True).stdout
    line = next(line for line in info.splitlines() if line.startswith("virtual size: "))
    assert line == f"virtual size: {size_to_str(value)} ({value} bytes)"


def test_drive_add_and_drive_del_as_qemu(tmp_path: Path) -> None:
    # Not migration, but the other block commands iotests type over HMP. Each program
    # gets its own images (they lock them); paths and implicit node names are normalized.
    require("qemu-system-x86_64")
    lines = [
        "drive_add", "drive_add 0",
        "drive_add 0 if=none,id=drive0,file=DIR/a.qcow2",
        "drive_add 0 if=none,id=drive0,file=DIR/a.qcow2",
        "drive_add 0 if=none,id=drive2,file=/nonexistent",
        "drive_add -n 0 if=none,id=drive4,file=DIR/b.qcow2",
        "drive_add 0 id=drive5,file=DIR/b.qcow2",
        "info block",
        "drive_del", "drive_del drive0", "drive_del drive0", "drive_del nosuch",
        "info block",
    ]
    answers: dict[bool, list[str]] = {}
    for qemu in (False, True):
        folder = tmp_path / ("qemu" if qemu else "ours")
        folder.mkdir()
        for name in ("a.qcow2", "b.qcow2"):
            qemu_img_create(folder / name)
        server = start_server([], folder, "vm", qemu=qemu)
        try:
            answers[qemu] = [re.sub(r"#block\d+", "#blockN", server.hmp(line.replace("DIR", str(folder))))
                             .replace(str(folder), "DIR") for line in lines]
            # The image was closed with the drive: nobody holds it any more.
            assert not is_writer(server.proc.pid, folder / "a.qcow2")
        finally:
            server.close()
    for line, mine, theirs in zip(lines, answers[False], answers[True], strict=True):
        assert mine == theirs, line
