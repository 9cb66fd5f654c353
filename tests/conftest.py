"""Shared fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import qemu_tools
from libvirt_support import Libvirtd, installed_entry_point, require_libvirt


@pytest.fixture
def qemu_img() -> str:
    """Path of qemu-img (skips, or fails under QMP_SERVER_REQUIRE_QEMU=1, when missing)."""
    return qemu_tools.require("qemu-img")


@pytest.fixture
def qemu_io() -> str:
    """Path of qemu-io."""
    return qemu_tools.require("qemu-io")


@pytest.fixture
def qemu_system() -> str:
    """Path of qemu-system-x86_64."""
    return qemu_tools.require("qemu-system-x86_64")


@pytest.fixture
def qemu_utils() -> None:
    """qemu-img and qemu-io both (for modules that check images with them)."""
    qemu_tools.require("qemu-img")
    qemu_tools.require("qemu-io")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory's ``qemu-system-x86_64``: a symlink to our installed entry point, for a
    libvirt domain's <emulator> (libvirt finds emulators for ``virsh capabilities`` by
    that name on its PATH; the symlink runs the console script with libvirt's arguments
    untouched). Skips without libvirt (fails in CI)."""
    require_libvirt()
    override = os.environ.get("QMP_SERVER_LIBVIRT_EMULATOR")  # development: another build
    entry = Path(override) if override else installed_entry_point()
    if entry is None:
        pytest.skip("the qmp-server console script is not installed (pip install -e .)")
    folder = tmp_path_factory.mktemp("emulator")
    (folder / "qemu-system-x86_64").symlink_to(entry)
    return folder / "qemu-system-x86_64"


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory, emulator: Path) -> Iterator[Libvirtd]:
    """One private session-mode libvirtd for the module (tests/libvirt_support.py)."""
    daemon = Libvirtd(tmp_path_factory.mktemp("libvirt"), emulator.parent)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.destroy_all()
        daemon.stop()
