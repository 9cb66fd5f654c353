"""A real install: the built wheel, in a fresh venv, serves from any directory.

Editable installs read ``schema/`` from the checkout; only a wheel shows whether the
package carries everything it needs (the schema files, every subpackage) and declares
every import it makes while serving (the venv has only the declared dependencies).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_support import Client

REPO = Path(__file__).resolve().parent.parent
#: What a build reads: copied, so that building leaves nothing in the checkout.
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "schema", "qmp_server", "blocklayer"]


@pytest.mark.slow
def test_wheel_in_fresh_venv_serves_from_another_directory(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(wheels), str(source)], check=True)
    [wheel] = wheels.glob("qmp_server-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(wheel)], check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sock = elsewhere / "vm.sock"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.Popen([venv / "bin" / "qmp-server", "-qmp", f"unix:{sock},server=on,wait=off"],
                            cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = Client(sock)
        assert client.execute("qmp_capabilities") == {"return": {}}
        assert client.cmd("query-status") == {"status": "running", "running": True}
        schema = client.cmd("query-qmp-schema")
        assert any(entity["name"] == "blockdev-add" for entity in schema)
        reply = client.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        assert reply == {"return": {}}
        assert client.execute("quit") == {"return": {}}
        client.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert b"Traceback" not in output, output.decode()
    # Serving needs none of the test-only dependencies.
    listed = subprocess.run([venv / "bin" / "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout
    assert "jsonschema" not in listed
