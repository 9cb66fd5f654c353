"""Facts the code keeps by hand, checked against the schema model at start-up.

Some enums and tables are written out in code because the code names their members
(``RunState.RUNNING``, ``MigrationStatus.DEVICE``) or because the schema does not carry
them (QEMU's migration parameter defaults). Each is a copy of something ``schema/``
decides, so the server refuses to start when a copy and the schema disagree, as
:class:`~qmp_server.dispatcher.Dispatcher` refuses commands without a schema:

* ``RunState`` (``runstate.py``) has exactly the values of the schema's ``RunState``;
* ``MigrationStatus`` (``migration/state.py``) uses only values of ``MigrationStatus``;
* ``CAPABILITIES`` (``migration/options.py``) is ``MigrationCapability``, in its order;
* ``PARAMETER_DEFAULTS`` names the members of ``MigrationParameters`` in their order (all
  but ``block-bitmap-mapping``, which QEMU reports only once set) and each default is a
  value ``migrate-set-parameters`` accepts for its member;
* the block graph's drivers are exactly ``BlockdevDriver`` (a driver the schema lacks
  could never be reached; a name the schema offers without a driver would fail late);
* the options the block graph keeps for itself (``COMMON_OPTIONS`` in ``blocklayer/graph.py``) are
  ``BlockdevOptions``' common members plus the child links some variants have.

``blocklayer`` knows nothing of the schema (the layers point one way), so its facts are
checked here, on the server's side. The checks compare a few short lists: they cost
microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from blocklayer.graph import COMMON_OPTIONS as GRAPH_OPTIONS

from .migration.options import CAPABILITIES, PARAMETER_DEFAULTS
from .migration.state import MigrationStatus
from .runstate import RunState
from .schema import TYPES_URI, Schema
from .schema_validate import Failure

#: Members of MigrationParameters QEMU leaves out of query-migrate-parameters until set.
UNREPORTED_PARAMETERS = frozenset({"block-bitmap-mapping"})
#: Options the block graph handles for every driver that has them: the child links.
GRAPH_CHILD_OPTIONS = frozenset({"file", "backing"})


class SchemaMismatch(ValueError):
    """A table in the code disagrees with the schema."""


def _defs(schema: Schema) -> Mapping[str, Any]:
    defs: Mapping[str, Any] = schema.types_document["$defs"]
    return defs


def enum_values(schema: Schema, name: str) -> tuple[str, ...]:
    """The values of the schema's enum type ``name``, in order."""
    try:
        return tuple(_defs(schema)[name]["enum"])
    except KeyError:
        raise SchemaMismatch(f"schema/types.json has no enum {name}") from None


def _differences(ours: Iterable[str], theirs: Iterable[str]) -> str:
    ours, theirs = list(ours), list(theirs)
    parts = []
    extra = [value for value in ours if value not in theirs]
    missing = [value for value in theirs if value not in ours]
    if extra:
        parts.append(f"not in the schema: {extra}")
    if missing:
        parts.append(f"missing from the code: {missing}")
    if not parts:
        parts.append(f"order differs: code {ours}, schema {theirs}")
    return "; ".join(parts)


def check_values(what: str, type_name: str, ours: Iterable[str], schema_values: Iterable[str], *,
                 subset: bool = False, ordered: bool = False) -> None:
    """Raise :class:`SchemaMismatch` unless ``ours`` matches the schema's values.

    ``subset``: the code may use fewer values; ``ordered``: the order must be the same.
    """
    ours, schema_values = list(ours), list(schema_values)
    if subset:
        ok = set(ours) <= set(schema_values)
    elif ordered:
        ok = ours == schema_values
    else:
        ok = sorted(ours) == sorted(schema_values)
    if not ok:
        shown = [v for v in ours if v not in schema_values] if subset else None
        detail = f"not in the schema: {shown}" if shown is not None else _differences(ours, schema_values)
        raise SchemaMismatch(f"{what} disagrees with schema/types.json {type_name}: {detail}")


def check_run_states(schema: Schema) -> None:
    """``RunState`` in ``runstate.py`` against the schema's ``RunState``."""
    check_values("RunState (qmp_server/runstate.py)", "RunState",
                 [state.value for state in RunState], enum_values(schema, "RunState"))


def check_migration(schema: Schema) -> None:
    """Migration statuses, capabilities and parameter defaults against the schema."""
    check_values("MigrationStatus (qmp_server/migration/state.py)", "MigrationStatus",
                 [status.value for status in MigrationStatus], enum_values(schema, "MigrationStatus"),
                 subset=True)
    check_values("CAPABILITIES (qmp_server/migration/options.py)", "MigrationCapability",
                 CAPABILITIES, enum_values(schema, "MigrationCapability"), ordered=True)
    members = [name for name in _defs(schema)["MigrationParameters"]["properties"]
               if name not in UNREPORTED_PARAMETERS]
    check_values("PARAMETER_DEFAULTS (qmp_server/migration/options.py)", "MigrationParameters",
                 PARAMETER_DEFAULTS, members, ordered=True)
    # The argument type of migrate-set-parameters has the same members; only its tls-*
    # members also take null.
    try:
        schema.argument_node("migrate-set-parameters").check(dict(PARAMETER_DEFAULTS))
    except Failure as failure:
        raise SchemaMismatch(f"PARAMETER_DEFAULTS (qmp_server/migration/options.py) holds a value "
                             f"migrate-set-parameters refuses: {failure.message()}") from None


def check_block(schema: Schema, drivers: Iterable[str], graph_options: Iterable[str]) -> None:
    """The block graph's drivers and the options it keeps, against ``BlockdevOptions``.

    ``drivers``: the driver names the graph opens; ``graph_options``: the options it takes
    out before handing the rest to the driver.
    """
    check_values("the block graph's drivers (blocklayer/graph.py)", "BlockdevDriver",
                 drivers, enum_values(schema, "BlockdevDriver"))
    options = _defs(schema)["BlockdevOptions"]
    common = list(options["properties"])
    variant_members: set[str] = set()
    for clause in options.get("allOf", ()):
        then = clause["then"]
        if "$ref" in then:
            then = schema.resolve(TYPES_URI, then["$ref"])[1]
        variant_members.update(then.get("properties", ()))
    children = sorted(GRAPH_CHILD_OPTIONS - variant_members)
    if children:
        raise SchemaMismatch(f"BlockdevOptions: no driver has the child options {children}")
    check_values("the block graph's common options (blocklayer/graph.py)", "BlockdevOptions",
                 set(graph_options) - GRAPH_CHILD_OPTIONS, common)


def check_all(schema: Schema, drivers: Iterable[str]) -> None:
    """Every check above; ``drivers`` are the names the machine's block graph opens."""
    check_run_states(schema)
    check_migration(schema)
    check_block(schema, drivers, GRAPH_OPTIONS)
