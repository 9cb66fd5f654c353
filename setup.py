"""Build hook: the wheel carries the repository's ``schema/`` as ``qmp_server/_schema``.

``schema/`` stays at the top of the repository as the one source of truth; the server
finds it there in a source checkout and in ``qmp_server/_schema`` once installed
(``qmp_server.schema.DEFAULT_DIRECTORY``). Everything else is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithSchema(build_py):
    """``build_py`` that also copies the schema files into the built package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "qmp_server" / "_schema"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(HERE / "schema", target, ignore=shutil.ignore_patterns("*.md"))


setup(cmdclass={"build_py": BuildPyWithSchema})
