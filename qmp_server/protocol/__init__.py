"""QMP as QEMU speaks it, without I/O: the bottom layer of the server.

One idea per module:

- :mod:`.framing`: QEMU's JSON stream parser (lexer, streamer, parser): bytes in,
  messages and parse errors out, with QEMU's texts, limits and recovery;
- :mod:`.qdict`: QEMU's QDict member order (which fault is reported first, how an
  echoed ``id`` is ordered);
- :mod:`.requests`: QEMU's checks of a request before dispatch, and the reply's shape;
- :mod:`.encoding`: QEMU's JSON output, byte for byte;
- :mod:`.fastpath`: answering a plain query straight from its bytes;
- :mod:`.session`: one connection's protocol state (greeting, negotiation, OOB policy,
  events), producing every byte the server sends it.

No sockets, no tasks: :mod:`qmp_server.server` moves the bytes. Nothing is imported
here, so that a module needing one part (keyval needs :mod:`.qdict`) gets only that.
"""
