"""Command registry and dispatch: schema validation, handler lookup, error mapping.

What the protocol decides before a command runs (QEMU's request checks, negotiation,
the OOB policy) is the session's (:mod:`qmp_server.protocol.session`); the dispatcher
runs what the session lets through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from blocklayer.errors import BlockError

from .errors import CommandNotFound, QMPError
from .protocol.requests import Request
from .protocol.session import QMPSession

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)


class CommandContext:
    """What a command handler may use: the machine and the calling session.

    A plain class rather than a dataclass: creating a dataclass compiles its generated
    methods, ~0.5 ms at every start (issue 9 §5).
    """

    __slots__ = ("after_reply", "machine", "session")

    def __init__(self, machine: Machine, session: QMPSession) -> None:
        self.machine = machine
        self.session = session
        #: Run by the connection after the reply was written (``quit`` exits there).
        self.after_reply: list[Callable[[], None]] = []


Handler = Callable[[CommandContext, dict[str, Any]], Awaitable[Any]]
#: A side-effect-free query without arguments: the result from the machine's state alone.
Query = Callable[["Machine"], Any]


class CommandTable:
    """A set of command handlers; each command module fills one."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.queries: dict[str, Query] = {}

    def command(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` for command ``name``."""

        def register(handler: Handler) -> Handler:
            if name in self.handlers:
                raise ValueError(f"command {name} registered twice")
            self.handlers[name] = handler
            return handler

        return register

    def query(self, name: str) -> Callable[[Query], Query]:
        """Decorator registering a plain query for command ``name``.

        It must take no arguments, change nothing and never fail, so that the session may
        answer it without the general request path (see :mod:`qmp_server.protocol.fastpath`);
        the general path runs the same function.
        """

        def register(query: Query) -> Query:
            async def handler(ctx: CommandContext, args: dict[str, Any]) -> Any:
                return query(ctx.machine)

            handler.__doc__ = query.__doc__
            self.command(name)(handler)
            self.queries[name] = query
            return query

        return register


class Dispatcher:
    """Runs checked requests against the registered handlers."""

    def __init__(self, machine: Machine, tables: list[CommandTable]) -> None:
        self.machine = machine
        self.schema = machine.schema
        self.handlers: dict[str, Handler] = {}
        #: Argument-free queries the fast path may answer (see CommandTable.query).
        self.queries: dict[str, Query] = {}
        for table in tables:
            for name in table.queries:
                if self.schema.commands[name].arguments.get("properties"):
                    raise ValueError(f"query {name} takes arguments: it cannot be a plain query")
            self.queries.update(table.queries)
            for name, handler in table.handlers.items():
                if name in self.handlers:
                    raise ValueError(f"command {name} registered twice")
                if name not in self.schema.commands:
                    raise ValueError(f"command {name} has no schema")
                self.handlers[name] = handler
        missing = set(self.schema.commands) - set(self.handlers)
        if missing:
            raise ValueError(f"schema commands without a handler: {sorted(missing)}")

    def plain_queries(self) -> dict[str, Callable[[], Any]]:
        """The plain queries, bound to the machine, for a session's fast path."""
        machine = self.machine
        return {name: partial(query, machine) for name, query in self.queries.items()}

    async def dispatch(self, session: QMPSession,
                       request: Request) -> tuple[Any, QMPError | None, CommandContext]:
        """Execute ``request`` (one the session let through, see ``QMPSession.begin``).

        Returns the result, or the error to answer with, and the context (for after-reply
        work).
        """
        context = CommandContext(self.machine, session)
        try:
            result = await self._execute(context, request)
        except QMPError as err:
            return None, err, context
        except BlockError as err:
            return None, QMPError(err.message), context
        return result, None, context

    async def _execute(self, context: CommandContext, request: Request) -> Any:
        name = request.command
        handler = self.handlers.get(name)
        if handler is None:
            raise CommandNotFound(f"The command {name} has not been found")
        info = self.schema.commands[name]
        if request.oob and not info.allow_oob:
            raise QMPError(f"The command {name} does not support OOB")
        self.schema.validate_arguments(name, request.arguments)
        return await handler(context, request.arguments)
