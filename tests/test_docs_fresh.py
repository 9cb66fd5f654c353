"""docs/qmp-reference.md must match what the schema generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qmp_server.docgen import DEFAULT_OUTPUT, main, render
from qmp_server.schema import Schema


def test_reference_doc_is_fresh() -> None:
    assert DEFAULT_OUTPUT.read_text(encoding="utf-8") == render(), "stale: run python -m qmp_server.docgen"


def test_reference_doc_covers_everything() -> None:
    schema = Schema.load()
    text = DEFAULT_OUTPUT.read_text(encoding="utf-8")
    for name in schema.commands:
        assert f"### `{name}`\n" in text
    for name in schema.events:
        assert f"### `{name}` event\n" in text
    for name in ("BlockdevOptions", "BlockdevOptionsQcow2", "MigrationCapability", "StatusInfo"):
        assert f"### {name}\n" in text


def test_check_mode(tmp_path: Path) -> None:
    output = tmp_path / "reference.md"
    assert main(["--check", "--output", str(output)]) == 1  # missing
    output.write_text("stale\n", encoding="utf-8")
    assert main(["--check", "--output", str(output)]) == 1
    assert output.read_text(encoding="utf-8") == "stale\n"  # --check changes nothing
    assert main(["--output", str(output)]) == 0
    assert main(["--check", "--output", str(output)]) == 0


def test_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmp_server.docgen", "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
