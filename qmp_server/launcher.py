"""The ``qmp-server`` program as launched: the console script and ``python -m qmp_server``.

Only start-up and exit time live here (issue 9 §5); :func:`qmp_server.main.main` does the
work, and importing :mod:`qmp_server` as a library changes neither the garbage collector
nor how the process ends.

* The cyclic garbage collector is off while the program's modules are imported and the
  machine is set up: start-up allocates hundreds of thousands of objects that all live
  until exit, and collecting them over and over only costs time (~10-20 ms here).
  Once serving, the start-up objects are frozen (``gc.freeze``: later collections do not
  walk them, a full collection of them took 3-7 ms) and the collector is turned on
  again. The price: start-up objects that become cyclic garbage later (the ~2,000 that
  set-up leaves, a ``-blockdev`` node deleted with ``blockdev-del``) are left to reference
  counting; a bounded amount of memory, once, that does not grow with use, since what
  serving allocates is collected as usual.
* After the orderly shutdown (images flushed and closed, lock bytes released, socket
  files and the pidfile removed, clients' replies written: all done by ``main`` before
  it returns) the process ends with ``os._exit`` instead of Python's finalization, which
  only tears down module globals and objects the kernel frees anyway (~35 ms here). QEMU
  does not free its heap at exit either. Buffered standard output and the log handlers
  are flushed first.
"""

from __future__ import annotations

import gc

# Before importing the program's modules, hence imports that are not at the top (E402).
gc.disable()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import NoReturn  # noqa: E402

from .main import main  # noqa: E402


def _collect_from_now_on() -> None:
    """Set-up is over: keep what it built out of collections, and collect from now on."""
    gc.freeze()
    gc.enable()


def _exit_status(code: object) -> int:
    """The process's exit status for ``SystemExit(code)``, as the interpreter decides it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    # SystemExit("text"): the interpreter prints the text and exits with status 1.
    print(code, file=sys.stderr)
    return 1


def _flush_standard_streams() -> bool:
    """Flush stdout and stderr as finalization would; False if that failed."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            ok = False
    return ok


def run() -> NoReturn:
    """Entry point of the ``qmp-server`` script and ``python -m qmp_server``."""
    try:
        main(on_serving=_collect_from_now_on, report_signals=True)
        status = 0
    except SystemExit as exit_request:
        status = _exit_status(exit_request.code)
    logging.shutdown()
    if not _flush_standard_streams() and status == 0:
        # The interpreter's exit status when flushing stdout fails at exit (Py_FinalizeEx).
        status = 120
    os._exit(status)
