"""The ``file`` driver: bytes on disk, QEMU's error texts, and lock interop with QEMU tools."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lock_probe import held_bytes

from blocklayer.drivers import file as file_mod
from blocklayer.drivers.file import FileDriver
from blocklayer.errors import BlockError
from blocklayer.perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED

# What a qcow2 node asks of its file child while active, and after inactivation.
QCOW2_PERM = CONSISTENT_READ | WRITE | RESIZE
QCOW2_SHARED = CONSISTENT_READ | WRITE_UNCHANGED
QCOW2_BYTES = {100, 101, 103, 201, 203}

OpenFn = Callable[..., FileDriver]


@pytest.fixture
def opened() -> Iterator[OpenFn]:
    """Open FileDrivers that are closed at teardown."""
    drivers: list[FileDriver] = []

    def open_driver(
        path: Path | str, *, read_only: bool = False, inactive: bool = False, **opts: Any
    ) -> FileDriver:
        driver = FileDriver()
        driver.open({"filename": str(path), **opts}, read_only=read_only, inactive=inactive)
        drivers.append(driver)
        return driver

    yield open_driver
    for driver in drivers:
        driver.close()


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    return path


@pytest.fixture
def qcow2(tmp_path: Path, qemu_img: str) -> Path:
    path = tmp_path / "disk.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", str(path), "1M"], check=True, capture_output=True)
    return path


def take(driver: FileDriver, perm: int, shared: int) -> None:
    driver.perm_prepare(perm, shared)
    driver.perm_commit(perm, shared)


def failure(call: Callable[[], object]) -> str:
    """The message of the BlockError ``call`` raises (notes such as hints excluded)."""
    with pytest.raises(BlockError) as info:
        call()
    return str(info.value)


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=30)


@pytest.fixture
def background() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a QEMU tool in the background; wait until it holds its locks; kill at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*cmd: str | Path, image: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        end = time.monotonic() + 10
        last: set[int] = set()
        since = time.monotonic()
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            held = held_bytes(image)
            if held != last:
                last, since = held, time.monotonic()
            elif 100 in held and time.monotonic() - since > 0.1:
                return proc
            time.sleep(0.01)
        raise AssertionError(f"{cmd} never locked {image}")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# --- open ----------------------------------------------------------------------------


@pytest.mark.qemu
def test_open_errors_match_qemu(tmp_path: Path, raw: Path, qemu_io: str) -> None:
    cases: list[tuple[dict[str, Any], bool, str, int]] = [
        ({"filename": str(tmp_path / "missing")}, False, f"filename={tmp_path / 'missing'}", errno.ENOENT),
        ({"filename": str(tmp_path)}, False, f"filename={tmp_path}", errno.EISDIR),
        ({"filename": str(tmp_path)}, True, f"filename={tmp_path}", errno.EINVAL),
        ({"filename": str(raw), "aio": "native"}, False, f"filename={raw},aio=native", errno.EINVAL),
        ({"filename": str(raw), "pr-manager": "pr0"}, False, f"filename={raw},pr-manager=pr0", errno.EINVAL),
        ({"filename": str(raw), "locking": "maybe"}, False, f"filename={raw},locking=maybe", errno.EINVAL),
    ]
    for options, read_only, image_opts, err in cases:
        driver = FileDriver()
        with pytest.raises(BlockError) as info:
            driver.open(options, read_only=read_only, inactive=False)
        extra = ["-r"] if read_only else []
        result = run(qemu_io, *extra, "--image-opts", f"driver=file,{image_opts}", "-c", "read 0 512")
        assert str(info.value) == result.stderr.strip().split("can't open: ", 1)[1]
        assert info.value.errno == err
        assert driver.fd == -1
    assert str(info.value) == "invalid parameter value: maybe"


def test_open_error_text(tmp_path: Path) -> None:
    with pytest.raises(BlockError) as info:
        FileDriver().open({"filename": str(tmp_path / "nope")}, read_only=True, inactive=False)
    assert str(info.value) == f"Could not open '{tmp_path / 'nope'}': No such file or directory"
    assert info.value.errno == errno.ENOENT


def _open_read_write(path: Path) -> str:
    """Open ``path`` read-write with FileDriver, as an unprivileged user if we are root.

    Root ignores file modes, so as root the open happens in a forked child that has
    dropped to 'nobody'; the result comes back through a pipe.
    """

    def attempt() -> str:
        try:
            FileDriver().open({"filename": str(path)}, read_only=False, inactive=False)
        except BlockError as err:
            return f"{err.errno}:{err}"
        return "opened"

    if os.geteuid() != 0:
        return attempt()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, attempt().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


def test_open_read_write_without_permission_reports_eacces() -> None:
    # A directory the unprivileged child can enter (pytest's tmp_path is private to root).
    directory = Path(tempfile.mkdtemp(prefix="qmp-eacces-"))
    try:
        directory.chmod(0o755)
        image = directory / "ro.raw"
        image.write_bytes(bytes(4096))
        image.chmod(0o444)
        assert _open_read_write(image) == f"{errno.EACCES}:Could not open '{image}': Permission denied"
        image.chmod(0o666)
        assert _open_read_write(image) == "opened"
    finally:
        shutil.rmtree(directory)


def test_open_flags(raw: Path, opened: OpenFn) -> None:
    ro = opened(raw, read_only=True)
    rw = opened(
        raw, aio="io_uring", **{"aio-max-batch": 8, "drop-cache": False, "x-check-cache-dropped": True}
    )
    direct = opened(raw, aio="native", cache={"direct": True, "no-flush": False})
    assert fcntl.fcntl(ro.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert fcntl.fcntl(rw.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    assert fcntl.fcntl(direct.fd, fcntl.F_GETFL) & os.O_DIRECT
    assert not fcntl.fcntl(rw.fd, fcntl.F_GETFL) & os.O_DIRECT
    for driver in (ro, rw, direct):
        assert fcntl.fcntl(driver.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert driver.filename == str(raw)
    assert direct.request_alignment in (512, 1024, 2048, 4096)


# --- I/O -----------------------------------------------------------------------------


def test_read_write_round_trip_and_zeroes_past_eof(tmp_path: Path, opened: OpenFn) -> None:
    path = tmp_path / "small"
    path.write_bytes(b"a" * 1000)
    driver = opened(path)
    assert driver.getlength() == 1000
    assert driver.read(990, 20) == b"a" * 10 + bytes(10)
    assert driver.read(5000, 7) == bytes(7)
    driver.write(995, b"0123456789")
    assert driver.getlength() == 1005
    driver.write(2000, b"xyz")
    assert driver.getlength() == 2003
    expected = b"a" * 995 + b"0123456789" + bytes(995) + b"xyz"
    assert path.read_bytes() == expected
    assert driver.read(0, 3000) == expected + bytes(997)


@pytest.mark.qemu
def test_qemu_reads_what_we_wrote(raw: Path, opened: OpenFn, qemu_io: str) -> None:
    driver = opened(raw)
    driver.write(4096, b"\x5a" * 8192)
    driver.flush()
    driver.close()
    result = run(qemu_io, "-f", "raw", "-r", "-c", "read -P 0x5a 4096 8192", "-c", "read -P 0 0 4096", raw)
    assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, result


def test_write_zeroes(raw: Path, opened: OpenFn) -> None:
    driver = opened(raw)
    driver.write(0, b"\xff" * (1 << 20))
    driver.write_zeroes(1000, 70000)
    driver.write_zeroes(200000, 65536, may_unmap=True)
    driver.write_zeroes((1 << 20) - 100, 300, may_unmap=True)  # reaches past EOF: grows
    driver.write_zeroes((1 << 20) + 4096, 100)  # starts past EOF
    data = raw.read_bytes()
    assert len(data) == (1 << 20) + 4196 == driver.getlength()
    assert data[:1000] == b"\xff" * 1000
    assert data[1000:71000] == bytes(70000)
    assert data[71000:200000] == b"\xff" * (200000 - 71000)
    assert data[200000:265536] == bytes(65536)
    assert data[265536 : (1 << 20) - 100] == b"\xff" * ((1 << 20) - 100 - 265536)
    assert data[(1 << 20) - 100 :] == bytes(4296)


def test_write_zeroes_with_unmap_punches(raw: Path, opened: OpenFn) -> None:
    driver = opened(raw)
    driver.write(0, b"\x01" * (1 << 20))
    driver.flush()
    before = os.stat(raw).st_blocks
    driver.write_zeroes(0, 1 << 19, may_unmap=True)
    assert os.stat(raw).st_blocks * 512 <= before * 512 - (1 << 19)
    assert raw.read_bytes() == bytes(1 << 19) + b"\x01" * (1 << 19)


def test_write_zeroes_without_fallocate_writes_zeroes(
    raw: Path, opened: OpenFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(raw)
    driver.write(0, b"\x02" * 10000)
    calls: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(mode)
        return errno.ENOTSUP

    monkeypatch.setattr(file_mod, "fallocate", unsupported)
    driver.write_zeroes(100, 5000, may_unmap=True)
    driver.write_zeroes(1 << 20, 10)
    assert raw.read_bytes()[:10000] == b"\x02" * 100 + bytes(5000) + b"\x02" * 4900
    assert driver.getlength() == (1 << 20) + 10
    # Once unsupported, QEMU stops asking: only the unmap attempt is repeated.
    calls.clear()
    driver.write_zeroes(0, 10)
    assert calls == []


def test_discard_punches_and_keeps_size(raw: Path, opened: OpenFn) -> None:
    driver = opened(raw)
    driver.write(0, b"\x03" * (1 << 20))
    driver.flush()
    before = os.stat(raw).st_blocks * 512
    driver.discard(0, 1 << 20)
    assert os.stat(raw).st_size == 1 << 20
    assert os.stat(raw).st_blocks * 512 < before
    assert driver.image_info() == {"actual-size": os.stat(raw).st_blocks * 512}
    assert driver.read(0, 1 << 20) == bytes(1 << 20)


def test_discard_unsupported_is_quietly_disabled(
    raw: Path, opened: OpenFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(raw)
    calls: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(mode)
        return errno.ENOTSUP

    monkeypatch.setattr(file_mod, "fallocate", unsupported)
    driver.discard(0, 4096)
    driver.discard(0, 4096)
    assert calls == [file_mod.FALLOC_FL_PUNCH_HOLE | file_mod.FALLOC_FL_KEEP_SIZE]

    monkeypatch.setattr(file_mod, "fallocate", lambda *args: errno.EIO)
    fresh = opened(raw)
    with pytest.raises(BlockError) as info:
        fresh.discard(0, 4096)
    assert info.value.errno == errno.EIO


@pytest.mark.qemu
def test_truncate_and_first_block_like_qemu(tmp_path: Path, opened: OpenFn, qemu_img: str) -> None:
    ours = tmp_path / "ours.raw"
    ours.touch()
    driver = opened(ours)
    driver.truncate(1 << 20)
    driver.close()
    theirs = tmp_path / "theirs.raw"
    subprocess.run([qemu_img, "create", "-f", "raw", str(theirs), "1M"], check=True, capture_output=True)

    def layout(path: Path) -> Any:
        out = run(qemu_img, "map", "--output=json", "-f", "raw", path)
        return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(out.stdout)]

    assert layout(ours) == layout(theirs)
    assert os.stat(ours).st_size == os.stat(theirs).st_size

    driver = opened(ours)
    driver.truncate(1000)
    assert driver.getlength() == os.stat(ours).st_size == 1000


@pytest.mark.qemu
def test_actual_size_matches_qemu_img(raw: Path, opened: OpenFn, qemu_img: str) -> None:
    driver = opened(raw)
    driver.discard(0, 1 << 20)
    driver.write(65536, b"x" * 100000)
    driver.flush()
    info = json.loads(run(qemu_img, "info", "-U", "--output=json", "-f", "raw", raw).stdout)
    assert driver.image_info()["actual-size"] == info["actual-size"]


# --- O_DIRECT ------------------------------------------------------------------------


@pytest.mark.parametrize("initial", [0, 10000], ids=["empty-file", "data-file"])
def test_direct_io_matches_buffered_io(tmp_path: Path, opened: OpenFn, initial: int) -> None:
    """Unaligned requests on O_DIRECT leave exactly the bytes and size buffered I/O does."""
    direct_path = tmp_path / "direct"
    buffered_path = tmp_path / "buffered"
    seed = os.urandom(initial)
    direct_path.write_bytes(seed)
    buffered_path.write_bytes(seed)
    direct = opened(direct_path, cache={"direct": True})
    buffered = opened(buffered_path)
    if initial == 0:
        assert direct.request_alignment == max(4096, mmap.PAGESIZE)
    else:
        assert direct.request_alignment in (512, 1024, 2048, 4096)
    rng = random.Random(initial)
    for _ in range(150):
        offset = rng.randrange(0, 3 << 20 if rng.random() < 0.1 else 20000)
        length = rng.choice([1, 7, 511, 512, 513, 4095, 4096, 4097, rng.randrange(1, 1 << 21)])
        op = rng.random()
        if op < 0.4:
            data = rng.randbytes(length)
            direct.write(offset, data)
            buffered.write(offset, data)
        elif op < 0.5:
            unmap = rng.random() < 0.5
            direct.write_zeroes(offset, length, unmap)
            buffered.write_zeroes(offset, length, unmap)
        elif op < 0.55:
            direct.discard(offset, length)
            buffered.discard(offset, length)
        elif op < 0.6:
            direct.truncate(offset)
            buffered.truncate(offset)
        else:
            assert direct.read(offset, length) == buffered.read(offset, length)
        assert direct.getlength() == buffered.getlength()
    assert direct_path.read_bytes() == buffered_path.read_bytes()


def test_direct_alignment_probe(tmp_path: Path, opened: OpenFn, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    # Any read of an empty file succeeds, so the probe learns nothing: QEMU then assumes
    # the safe maximum.
    assert opened(empty, cache={"direct": True}).request_alignment == max(4096, mmap.PAGESIZE)

    data = tmp_path / "data"
    data.write_bytes(b"d" * 8192)
    real_preadv = os.preadv

    def picky(fd: int, buffers: list[memoryview], offset: int) -> int:
        if sum(len(b) for b in buffers) < 2048:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", picky)
    assert opened(data, cache={"direct": True}).request_alignment == 2048

    def never(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "preadv", never)
    driver = FileDriver()
    with pytest.raises(BlockError) as info:
        driver.open({"filename": str(data), "cache": {"direct": True}}, read_only=True, inactive=False)
    assert str(info.value) == "Could not find working O_DIRECT alignment"
    assert info.value.__notes__ == ["Try cache.direct=off"]
    assert driver.fd == -1


# --- flush and cache -----------------------------------------------------------------


def test_failed_fdatasync_makes_every_later_flush_fail(
    raw: Path, opened: OpenFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(raw)
    direct = opened(raw, cache={"direct": True})
    real = os.fdatasync
    failures = {"left": 2}
    synced: list[int] = []

    def flaky(fd: int) -> None:
        synced.append(fd)
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)
    driver.write(0, b"x")
    for _ in range(3):
        with pytest.raises(BlockError) as info:
            driver.flush()
        assert info.value.errno == errno.EIO
        assert str(info.value) == "Input/output error"
    with pytest.raises(BlockError) as info:
        driver.invalidate_cache()
    assert str(info.value) == "flush failed: Input/output error"
    assert synced == [driver.fd]  # the later failures did not even try
    # O_DIRECT bypasses the page cache: a failure there is not sticky.
    direct.write(0, bytes(4096))
    failures["left"] = 1
    with pytest.raises(BlockError):
        direct.flush()
    direct.flush()
    # Nothing written since the last successful flush: no fdatasync at all (as QEMU).
    count = len(synced)
    direct.flush()
    assert len(synced) == count


def test_no_flush_skips_fdatasync(raw: Path, opened: OpenFn, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = opened(raw, cache={"no-flush": True})
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    driver.write(0, b"dirty")
    driver.flush()
    assert synced == []


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the host page cache."""
    return len(resident_page_set(path))


def test_invalidate_cache_drops_the_page_cache(raw: Path, opened: OpenFn) -> None:
    driver = opened(raw)
    driver.write(0, b"c" * (1 << 20))
    assert driver.read(0, 1 << 20) == b"c" * (1 << 20)
    assert resident_pages(raw) > 0
    driver.invalidate_cache()
    assert resident_pages(raw) == 0
    assert raw.read_bytes() == b"c" * (1 << 20)  # flushed before dropping

    keep = opened(raw, **{"drop-cache": False})
    keep.read(0, 1 << 20)
    keep.invalidate_cache()
    assert resident_pages(raw) > 0
    driver.close()
    assert failure(driver.invalidate_cache) == "The file descriptor is not open: Input/output error"


# --- locking with real QEMU ----------------------------------------------------------


@pytest.mark.qemu
def test_qemu_tools_see_our_locks(qcow2: Path, opened: OpenFn, qemu_img: str, qemu_io: str) -> None:
    driver = opened(qcow2)
    take(driver, QCOW2_PERM, QCOW2_SHARED)
    assert held_bytes(qcow2) == QCOW2_BYTES == set(driver.locked_bytes)

    info = run(qemu_img, "info", qcow2)
    assert info.returncode != 0
    assert 'Failed to get shared "write" lock' in info.stderr
    assert f"Is another process using the image [{qcow2}]?" in info.stderr
    assert run(qemu_img, "info", "-U", qcow2).returncode == 0
    write = run(qemu_io, "-c", "write 0 512", qcow2)
    assert write.returncode != 0 and 'Failed to get "write" lock' in write.stderr

    # An inactivated source: its qcow2 parent only reads and shares everything.
    driver.perm_prepare(CONSISTENT_READ, ALL)
    driver.perm_commit(CONSISTENT_READ, ALL)
    driver.set_inactive(True)
    assert held_bytes(qcow2) == {100}
    write = run(qemu_io, "-c", "write -P 0x11 0 512", qcow2)
    assert write.returncode == 0, write.stderr
    assert run(qemu_img, "info", qcow2).returncode == 0


@pytest.mark.qemu
def test_we_see_qemu_locks_with_qemu_error_texts(
    qcow2: Path, opened: OpenFn, qemu_io: str, background: Callable[..., subprocess.Popen[bytes]]
) -> None:
    background(qemu_io, "-f", "raw", "-c", "sleep 10000", qcow2, image=qcow2)
    assert held_bytes(qcow2) == {100, 101}
    # What a second QEMU says when it opens the image as qcow2 (same file perms as ours).
    qemu = run(qemu_io, "-c", "read 0 512", qcow2)
    qemu_text = qemu.stderr.split(f"can't open device {qcow2}: ", 1)[1].splitlines()[0]
    assert qemu_text == 'Failed to get shared "write" lock'

    driver = opened(qcow2)
    with pytest.raises(BlockError) as info:
        driver.perm_prepare(QCOW2_PERM, QCOW2_SHARED)
    assert str(info.value) == qemu_text
    assert info.value.errno == errno.EAGAIN
    assert info.value.__notes__ == [f"Is another process using the image [{qcow2}]?"]
    assert driver.locked_bytes == [] and held_bytes(qcow2) == {100, 101}
    driver.perm_abort()

    # Reading while sharing writes is compatible with a writer.
    take(driver, CONSISTENT_READ, ALL)
    assert held_bytes(qcow2) == {100, 101}


@pytest.mark.qemu
def test_exclusive_qemu_blocks_our_write(
    qcow2: Path, opened: OpenFn, qemu_io: str, background: Callable[..., subprocess.Popen[bytes]]
) -> None:
    background(qemu_io, "-c", "sleep 10000", qcow2, image=qcow2)
    assert held_bytes(qcow2) == QCOW2_BYTES
    driver = opened(qcow2)
    assert failure(lambda: driver.perm_prepare(WRITE, ALL)) == 'Failed to get "write" lock'
    assert (
        failure(lambda: driver.perm_prepare(CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED | RESIZE))
        == 'Failed to get shared "write" lock'
    )
    take(driver, CONSISTENT_READ, ALL)  # what qemu-img info -U amounts to


@pytest.mark.qemu
def test_same_bytes_as_qemu_for_qcow2(
    qcow2: Path, opened: OpenFn, qemu_io: str, background: Callable[..., subprocess.Popen[bytes]]
) -> None:
    proc = background(qemu_io, "-c", "sleep 10000", qcow2, image=qcow2)
    qemu_bytes = held_bytes(qcow2)
    proc.kill()
    proc.wait()
    driver = opened(qcow2)
    take(driver, QCOW2_PERM, QCOW2_SHARED)
    assert held_bytes(qcow2) == qemu_bytes == QCOW2_BYTES


# --- locking between our own nodes ---------------------------------------------------


def test_two_nodes_on_one_file_conflict(raw: Path, opened: OpenFn) -> None:
    first = opened(raw)
    take(first, QCOW2_PERM, QCOW2_SHARED)
    second = opened(raw)
    assert failure(lambda: second.perm_prepare(QCOW2_PERM, QCOW2_SHARED)) == 'Failed to get "write" lock'
    assert second.locked_bytes == []
    assert (
        failure(lambda: second.perm_prepare(CONSISTENT_READ, CONSISTENT_READ))
        == 'Failed to get shared "write" lock'
    )
    # The failed prepares took nothing: the first node's bytes are all that is held.
    assert held_bytes(raw) == QCOW2_BYTES
    take(second, CONSISTENT_READ, ALL)
    first.close()
    take(second, QCOW2_PERM, QCOW2_SHARED)
    assert held_bytes(raw) == QCOW2_BYTES


def test_prepare_holds_union_and_abort_restores(raw: Path, opened: OpenFn) -> None:
    driver = opened(raw)
    take(driver, CONSISTENT_READ, ALL)
    driver.perm_prepare(WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED)
    assert held_bytes(raw) == {100, 101, 103, 201, 203}
    driver.perm_abort()
    assert held_bytes(raw) == {100}
    driver.perm_prepare(QCOW2_PERM, QCOW2_SHARED)
    driver.perm_commit(QCOW2_PERM, QCOW2_SHARED)
    assert held_bytes(raw) == QCOW2_BYTES
    # A loosening prepare takes and checks nothing; the commit releases.
    driver.perm_prepare(CONSISTENT_READ, ALL)
    assert held_bytes(raw) == QCOW2_BYTES
    driver.perm_commit(CONSISTENT_READ, ALL)
    assert held_bytes(raw) == {100}


def test_failed_prepare_keeps_committed_bytes(raw: Path, opened: OpenFn) -> None:
    other = opened(raw)
    take(other, CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED)  # refuses writers
    driver = opened(raw)
    take(driver, CONSISTENT_READ, ALL & ~RESIZE)
    assert failure(lambda: driver.perm_prepare(QCOW2_PERM, QCOW2_SHARED)) == 'Failed to get "write" lock'
    assert driver.locked_bytes == [100, 203]


def test_inactivation_keeps_only_consistent_read(raw: Path, opened: OpenFn) -> None:
    driver = opened(raw)
    take(driver, QCOW2_PERM, QCOW2_SHARED)
    take(driver, CONSISTENT_READ, ALL)  # the inactive qcow2 parent's request
    driver.set_inactive(True)
    assert held_bytes(raw) == {100}
    # While inactive the lock state is frozen, whatever the graph asks.
    take(driver, 0, ALL)
    take(driver, QCOW2_PERM, QCOW2_SHARED)
    driver.perm_abort()
    assert held_bytes(raw) == {100}

    # Meanwhile the destination runs; reactivation must fail like QEMU's cont does.
    dest = opened(raw)
    take(dest, QCOW2_PERM, QCOW2_SHARED)
    driver.set_inactive(False)
    take(driver, CONSISTENT_READ, ALL)
    assert failure(lambda: driver.perm_prepare(QCOW2_PERM, QCOW2_SHARED)) == 'Failed to get "write" lock'
    assert driver.locked_bytes == [100]
    dest.close()
    take(driver, QCOW2_PERM, QCOW2_SHARED)
    assert held_bytes(raw) == QCOW2_BYTES


def test_node_opened_inactive_holds_nothing_until_activated(raw: Path, opened: OpenFn) -> None:
    source = opened(raw)
    take(source, QCOW2_PERM, QCOW2_SHARED)
    dest = opened(raw, inactive=True)
    take(dest, CONSISTENT_READ, ALL)
    assert dest.locked_bytes == []
    assert held_bytes(raw) == QCOW2_BYTES
    # The source inactivates; then the destination activates, file node first.
    take(source, CONSISTENT_READ, ALL)
    source.set_inactive(True)
    dest.set_inactive(False)
    take(dest, CONSISTENT_READ, ALL)
    assert dest.locked_bytes == [100]
    take(dest, QCOW2_PERM, QCOW2_SHARED)
    assert held_bytes(raw) == QCOW2_BYTES
    assert source.locked_bytes == [100]


def test_locking_off_holds_and_checks_nothing(raw: Path, opened: OpenFn) -> None:
    other = opened(raw)
    take(other, QCOW2_PERM, QCOW2_SHARED)
    driver = opened(raw, locking="off")
    take(driver, QCOW2_PERM, QCOW2_SHARED)
    assert driver.locked_bytes == []
    other.close()
    assert held_bytes(raw) == set()


def test_close_releases_locks(raw: Path, opened: OpenFn) -> None:
    driver = opened(raw)
    take(driver, QCOW2_PERM, QCOW2_SHARED)
    driver.close()
    assert held_bytes(raw) == set()
    driver.close()  # idempotent


def resident_page_set(path: Path) -> set[int]:
    """Indices of the pages of ``path`` in the host page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long)
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            assert libc.mincore(addr, size, vec) == 0
            return {i for i, b in enumerate(vec.raw) if b & 1}
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_prefetch_reads_exactly_the_ranges_back_in(raw: Path, opened: OpenFn) -> None:
    page = mmap.PAGESIZE
    driver = opened(raw)
    driver.write(0, b"p" * (1 << 20))
    driver.invalidate_cache()
    assert resident_pages(raw) == 0
    driver.prefetch([(0, 100), (8 * page + 10, 2 * page)])
    wanted = {0, 8, 9, 10}
    deadline = time.monotonic() + 10
    while not wanted <= resident_page_set(raw) and time.monotonic() < deadline:
        time.sleep(0.005)
    held = resident_page_set(raw)
    assert wanted <= held
    # A hint for those ranges, not a blanket read-ahead of the file.
    assert len(held) < (64 << 10) // page


@pytest.mark.parametrize("opts", [{"drop-cache": False}, {"cache": {"direct": True}}],
                         ids=["drop-cache-off", "direct"])
def test_prefetch_only_where_invalidation_drops_the_cache(raw: Path, opened: OpenFn,
                                                          opts: dict[str, Any]) -> None:
    driver = opened(raw, **opts)
    fd = os.open(raw, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages would stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert resident_pages(raw) == 0
    driver.prefetch([(0, 1 << 20)])
    time.sleep(0.05)
    assert resident_pages(raw) == 0
    driver.close()
    driver.prefetch([(0, 4096)])  # a hint never fails, not even on a closed node
