"""Lock-byte primitives and QEMU's permission encoding, checked against the kernel and QEMU."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lock_probe import held_bytes

from blocklayer import lockbytes
from blocklayer.errors import BlockError
from blocklayer.lockbytes import LockState, check_lock_bytes, lock_byte, lock_holder, unlock_byte
from blocklayer.perm import ALL, CONSISTENT_READ, PERM_NAMES, RESIZE, WRITE, WRITE_UNCHANGED


def proc_locks(path: Path) -> set[int]:
    """Every byte of ``path`` that /proc/locks lists as locked, by anybody."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held: set[int] = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields or dev not in fields:
            continue  # "->" marks a blocked waiter, not a held lock
        start, end = fields[-2:]
        held.update(range(int(start), int(end) + 1))
    return held


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 16))
    return path


@pytest.fixture
def fds(image: Path) -> Iterator[tuple[int, int]]:
    a = os.open(image, os.O_RDWR)
    b = os.open(image, os.O_RDWR)
    yield a, b
    os.close(a)
    os.close(b)


def test_ofd_locks_are_available_on_linux() -> None:
    assert lockbytes.ofd_available()


def test_shared_lock_is_seen_by_another_description_but_not_by_its_own(
    image: Path, fds: tuple[int, int]
) -> None:
    a, b = fds
    lock_byte(a, 101)
    holder = lock_holder(b, 101)
    assert holder is not None
    assert (holder.start, holder.length, holder.pid) == (101, 1, -1)  # OFD: no owning pid
    assert lock_holder(a, 101) is None
    assert lock_holder(b, 100) is None
    assert proc_locks(image) == {101}
    # Shared locks coexist; an exclusive one is refused: same process, other description.
    lock_byte(b, 101)
    with pytest.raises(OSError) as info:
        lock_byte(b, 101, exclusive=True)
    assert info.value.errno in (errno.EAGAIN, errno.EACCES)
    unlock_byte(a, 101)
    unlock_byte(b, 101)
    assert proc_locks(image) == set()


def test_closing_the_descriptor_drops_its_locks(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)
    lock_byte(fd, 100)
    assert held_bytes(image) == {100}
    os.close(fd)
    assert held_bytes(image) == set()


def test_posix_fallback_is_per_process(image: Path, fds: tuple[int, int]) -> None:
    a, b = fds
    lock_byte(a, 103, ofd=False)
    try:
        # POSIX locks belong to the process: another descriptor of ours sees nothing ...
        assert lock_holder(b, 103, ofd=False) is None
        # ... but another process sees the lock, with our pid.
        probe = (
            "import os, sys; from blocklayer.lockbytes import lock_holder; "
            "fd = os.open(sys.argv[1], os.O_RDONLY); h = lock_holder(fd, 103, ofd=False); "
            "print(h.pid if h else 0)"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(image)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent.parent,
        ).stdout
        assert int(out) == os.getpid()
    finally:
        unlock_byte(a, 103, ofd=False)


def test_apply_locks_perm_and_unshared_bytes(image: Path, fds: tuple[int, int]) -> None:
    a, _ = fds
    state = LockState(a)
    state.apply(CONSISTENT_READ | WRITE | RESIZE, ~(CONSISTENT_READ | WRITE_UNCHANGED), unlock=True)
    assert held_bytes(image) == proc_locks(image) == {100, 101, 103, 201, 203}
    assert state.locked_bytes() == [100, 101, 103, 201, 203]
    # Without unlock the old bytes stay (a prepare holds the union) ...
    state.apply(WRITE_UNCHANGED, 0, unlock=False)
    assert held_bytes(image) == {100, 101, 102, 103, 201, 203}
    # ... with unlock exactly the new set is held.
    state.apply(CONSISTENT_READ, 0, unlock=True)
    assert held_bytes(image) == {100}
    assert (state.locked_perm, state.locked_unshared) == (CONSISTENT_READ, 0)
    state.release_all()
    assert held_bytes(image) == set()


@pytest.mark.parametrize(("index", "bit", "name"), [(i, b, n) for i, (b, n) in enumerate(PERM_NAMES)])
def test_check_reports_each_permission_by_name(fds: tuple[int, int], index: int, bit: int, name: str) -> None:
    a, b = fds
    holder = LockState(a)
    holder.apply(bit, bit, unlock=True)  # holds the bit and refuses to share it
    with pytest.raises(BlockError) as info:
        check_lock_bytes(b, bit, ALL)
    assert str(info.value) == f'Failed to get "{name}" lock'
    assert info.value.errno == errno.EAGAIN
    holder.apply(bit, 0, unlock=True)  # now holds it but shares it
    check_lock_bytes(b, bit, ALL)
    with pytest.raises(BlockError) as info:
        check_lock_bytes(b, 0, ALL & ~bit)
    assert str(info.value) == f'Failed to get shared "{name}" lock'
    # The holder's own bytes never conflict with its own checks.
    holder.apply(ALL, ALL, unlock=True)
    check_lock_bytes(a, ALL, 0)


def test_check_order_is_unshared_bytes_first(fds: tuple[int, int]) -> None:
    a, b = fds
    LockState(a).apply(RESIZE, WRITE, unlock=True)  # bytes 103 and 201
    with pytest.raises(BlockError, match=r'^Failed to get "write" lock$'):
        check_lock_bytes(b, WRITE, ALL & ~RESIZE)


def test_system_errors_carry_strerror(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)
    state = LockState(fd)
    state.apply(WRITE, 0, unlock=True)
    os.close(fd)
    with pytest.raises(BlockError) as info:
        state.apply(0, 0, unlock=True)
    assert str(info.value) == "Failed to unlock byte 101: Bad file descriptor"
    assert info.value.errno == errno.EBADF
    with pytest.raises(BlockError) as info:
        LockState(fd).apply(CONSISTENT_READ, 0, unlock=False)
    assert str(info.value) == "Failed to lock byte 100: Bad file descriptor"
    with pytest.raises(BlockError) as info:
        check_lock_bytes(fd, WRITE, ALL)
    assert str(info.value) == 'Failed to get "write" lock: Bad file descriptor'


def _wait_for_bytes(path: Path, proc: subprocess.Popen[bytes], deadline: float = 10.0) -> set[int]:
    """The bytes ``proc`` holds once they have stopped changing (it is then at its sleep)."""
    end = time.monotonic() + deadline
    last: set[int] = set()
    stable_since = time.monotonic()
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        held = held_bytes(path)
        if held != last:
            last, stable_since = held, time.monotonic()
        elif 100 in held and time.monotonic() - stable_since > 0.1:
            return held
        time.sleep(0.01)
    return last


# (qemu-io arguments, perm, shared) of the file node for the same open.
QEMU_OPENS = [
    pytest.param(
        ["-f", "qcow2"], CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED, id="qcow2"
    ),
    pytest.param(["-f", "qcow2", "-r"], CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED, id="qcow2-ro"),
    pytest.param(["-f", "raw"], CONSISTENT_READ | WRITE, ALL, id="raw"),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("args", "perm", "shared"), QEMU_OPENS)
def test_same_bytes_as_qemu(
    tmp_path: Path, qemu_img: str, qemu_io: str, args: list[str], perm: int, shared: int
) -> None:
    path = tmp_path / "disk.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", str(path), "1M"], check=True, capture_output=True)
    proc = subprocess.Popen([qemu_io, *args, "-c", "sleep 10000", str(path)], stderr=subprocess.PIPE)
    try:
        qemu_bytes = _wait_for_bytes(path, proc)
        qemu_proc_locks = proc_locks(path)
    finally:
        proc.kill()
        proc.wait()
    assert qemu_bytes == qemu_proc_locks
    fd = os.open(path, os.O_RDWR)
    try:
        LockState(fd).apply(perm, ~shared, unlock=True)
        assert held_bytes(path) == proc_locks(path) == qemu_bytes
    finally:
        os.close(fd)
    if args == ["-f", "qcow2"]:
        assert qemu_bytes == {100, 101, 103, 201, 203}


def test_check_ignores_bytes_between_the_checked_ones(fds: tuple[int, int]) -> None:
    a, b = fds
    holder = LockState(a)
    # Bytes 102 and 202 (write unchanged), which a qcow2 file node neither asks for nor
    # refuses, lie between the bytes it checks (101/103 and 200/201/203).
    holder.apply(WRITE_UNCHANGED, WRITE_UNCHANGED, unlock=True)
    check_lock_bytes(b, CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED)
    # A checked byte next to them is still found, and named as QEMU names it.
    holder.apply(WRITE_UNCHANGED, WRITE_UNCHANGED | RESIZE, unlock=True)
    with pytest.raises(BlockError, match=r'^Failed to get "resize" lock$'):
        check_lock_bytes(b, CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED)
    holder.apply(WRITE_UNCHANGED | RESIZE, WRITE_UNCHANGED, unlock=True)
    with pytest.raises(BlockError, match=r'^Failed to get shared "resize" lock$'):
        check_lock_bytes(b, CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED)
