"""``python -m qmp_server``."""

from .launcher import run

run()
