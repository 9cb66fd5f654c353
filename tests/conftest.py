"""Shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import qemu_tools


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
