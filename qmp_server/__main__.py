"""``python -m qmp_server``."""

from .main import main

main()
