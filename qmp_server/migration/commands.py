"""Migration commands."""

from __future__ import annotations

from ..dispatcher import CommandTable

table = CommandTable()
