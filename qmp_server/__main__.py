"""``python -m qmp_server``."""

from .cli import main

main()
