"""Finding real QEMU binaries for tests that compare against them.

Tests that need QEMU call :func:`require` (or use the fixtures in conftest). Without the
binary they skip, except under ``QMP_SERVER_REQUIRE_QEMU=1`` (set by ``.ci/run``), where a
missing QEMU must fail the run rather than silently shrink it.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require(tool: str) -> str:
    """Path of a QEMU tool (``qemu-img``, ``qemu-io``, ``qemu-system-x86_64``), or skip/fail."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (apt-get install qemu-utils qemu-system-x86)"
        if os.environ.get("QMP_SERVER_REQUIRE_QEMU") == "1":
            pytest.fail(message + " but QMP_SERVER_REQUIRE_QEMU=1")
        pytest.skip(message)
    return path
