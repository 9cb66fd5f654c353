"""The block graph: opening and deleting nodes, permissions, activation, inactivation.

Every method runs under the caller's lock (the QMP adapter serialises all block
operations); none of them is safe to call concurrently.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .driver import BackingRequest, BlockDriver
from .drivers.file import FileDriver
from .drivers.null import NullDriver
from .drivers.raw import RawDriver
from .errors import BlockError
from .node import BlockNode, Edge, NodeOptions
from .perm import ALL, CONSISTENT_READ, WRITE, WRITE_UNCHANGED, ChildRole, perm_names
from .permissions import child_permissions
from .protocols import protocol_options

if TYPE_CHECKING:
    from .qcow2.driver import CorruptionListener

log = logging.getLogger(__name__)

DriverFactory = Callable[[], BlockDriver]

# Options every driver shares (QEMU's BlockdevOptions base); the rest go to the driver.
COMMON_OPTIONS = frozenset({
    "driver", "node-name", "discard", "cache", "read-only", "auto-read-only", "force-share",
    "detect-zeroes", "active", "file", "backing",
})


def default_drivers(corruption_listener: CorruptionListener | None = None) -> dict[str, DriverFactory]:
    """Our drivers by name (BlockdevDriver's spelling).

    ``corruption_listener`` hears of every image qcow2 marks corrupt. qcow2 is imported
    when its first node opens: a server that never opens a qcow2 image never loads it,
    which is most of the start-up time the block layer would cost (issue 9 §5).
    """

    def qcow2() -> BlockDriver:
        from .qcow2 import Qcow2Driver

        return Qcow2Driver(corruption_listener=corruption_listener)

    return {"file": FileDriver, "raw": RawDriver, "qcow2": qcow2, "null-co": NullDriver}


def probe_format(path: str) -> str:
    """The format of the image at ``path`` among our drivers, as bdrv_probe_all decides.

    qcow2 by its magic, else raw. Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as image:
        magic = image.read(4)
    return "qcow2" if magic == b"QFI\xfb" else "raw"


def plain_json(value: Any) -> str:
    """JSON text for ``json:`` file names when no monitor gave the graph QEMU's encoder:
    QEMU's separators, the members in the order they were put in."""
    return json.dumps(value, separators=(", ", ": "))


def _spelled_child(spelled: Mapping[str, Any] | None, name: str) -> Mapping[str, Any] | None:
    # The user's spelling of a child given inline (a reference has none to keep).
    child = spelled.get(name) if spelled is not None else None
    return child if isinstance(child, Mapping) else None


def _open_options(options: Mapping[str, Any], spelled: Mapping[str, Any] | None) -> dict[str, Any]:
    """QEMU's bs->options of a node opened with ``options``: flattened (qdict_flatten:
    ``cache.direct``), without the children (bdrv_open_child takes theirs away), each
    value as the user spelled it when ``spelled`` has it."""
    flat: dict[str, Any] = {}
    stack: list[tuple[Mapping[str, Any], Mapping[str, Any] | None, str]] = [(options, spelled, "")]
    while stack:
        tree, spelling, prefix = stack.pop()
        for key, value in tree.items():
            if not prefix and key in ("file", "backing"):
                continue
            given = spelling.get(key) if spelling is not None else None
            if isinstance(value, Mapping):
                stack.append((value, given if isinstance(given, Mapping) else None, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value if given is None or isinstance(given, Mapping) else given
    return flat


def flatten_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as a node holds them (bs->options): flattened, without its children."""
    return _open_options(options, None)


@dataclass(frozen=True)
class BackingOptions:
    """Options for the backing file an image names itself, given without saying which
    file or format that is: a ``-drive``'s ``backing.*`` options (``backing.node-name=``,
    ``backing.file.filename=``, ``backing.driver=``...), which QEMU's
    bdrv_open_backing_file lays over what the image header says.

    ``options`` are as given (a keyval tree of strings, not yet checked: the driver that
    decides what they may be is only known once the header is read). ``open_options``
    turns them, completed with the header's file and format, into the typed blockdev
    options to open and the same options as spelled (for file names), raising
    :class:`BlockError` with QEMU's text when they are wrong for that driver.
    """

    options: Mapping[str, Any]
    open_options: Callable[[dict[str, Any]], tuple[dict[str, Any], Mapping[str, Any]]]


def _merged(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``, nested dicts merged (qdict_join of flattened options)."""
    out = dict(low)
    for key, value in high.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            value = _merged(below, value)
        out[key] = value
    return out


def _id_wellformed(name: str) -> bool:
    # QEMU's id_wellformed: an ASCII letter, then letters, digits, '-', '.', '_'.
    if not name or not (name[0].isascii() and name[0].isalpha()):
        return False
    return all(c.isascii() and (c.isalnum() or c in "-._") for c in name)


class BlockGraph:
    """All nodes of one server, by name."""

    def __init__(self, drivers: Mapping[str, DriverFactory] | None = None,
                 filename_json: Callable[[Any], str] | None = None) -> None:
        self.drivers: Mapping[str, DriverFactory] = drivers if drivers is not None else default_drivers()
        #: Writes a node's full open options for its ``json:`` file name. QEMU writes them
        #: with qobject_to_json, in its QDict member order; whoever wires the graph to a
        #: monitor passes that encoder (the block layer knows no QMP), else plain JSON.
        self.filename_json: Callable[[Any], str] = filename_json or plain_json
        # Insertion order = name assignment order (children before their parent), which
        # query-named-block-nodes reports newest first, as QEMU does.
        self.nodes: dict[str, BlockNode] = {}
        self._generated = 0
        #: The driver options each node was opened with, for reopening it (QEMU keeps
        #: them as bs->options).
        self._driver_options: dict[BlockNode, dict[str, Any]] = {}
        #: The names of the BlockBackends the user named (-drive id=), which a node name
        #: may not take (bdrv_assign_node_name's blk_by_name). Whoever names backends
        #: sets it; the graph knows none.
        self.backend_names: Callable[[], Container[str]] = frozenset
        #: bdrv_get_device_name: the name of the BlockBackend using a node ("" for none),
        #: for QEMU's texts that name the device rather than the node.
        self.device_name: Callable[[BlockNode], str] = lambda node: ""

    # Lookup -------------------------------------------------------------------------

    def find(self, name: str) -> BlockNode | None:
        """The node called ``name``, or None."""
        return self.nodes.get(name)

    def lookup(self, name: str) -> BlockNode:
        """The node called ``name``, or QEMU's blockdev-del/set-active error."""
        node = self.nodes.get(name)
        if node is None:
            raise BlockError(f"Failed to find node with node-name='{name}'")
        return node

    def top_nodes(self) -> list[BlockNode]:
        """Nodes without a parent node, in creation order."""
        return [n for n in self.nodes.values() if not any(e.parent is not None for e in n.parents)]

    # Opening ------------------------------------------------------------------------

    def _generate_name(self) -> str:
        # QEMU's generated ids: a counter followed by two random digits, never well-formed
        # (they start with '#'), so they cannot clash with user names.
        name = f"#block{self._generated}{random.randrange(100):02d}"
        self._generated += 1
        return name

    def _check_name(self, name: str) -> None:
        # bdrv_assign_node_name, called before the driver opens anything (the file child
        # is open by then): well-formed, no BlockBackend's name, unique, short enough.
        if not _id_wellformed(name):
            raise BlockError(f"Invalid node-name: '{name}'")
        if name in self.backend_names():
            raise BlockError(f"node-name={name} is conflicting with a device id")
        if name in self.nodes:
            raise BlockError(f"Duplicate nodes with node-name='{name}'")
        if len(name) >= 32:
            raise BlockError("Node name too long")

    def open(self, options: Mapping[str, Any], *, inactive: bool = False,
             spelled: Mapping[str, Any] | None = None) -> BlockNode:
        """Open a node tree from validated ``blockdev-add`` options (monitor-owned root).

        ``inactive`` forces every new node inactive (the VM is in ``inmigrate``). On any
        error, everything this call opened is closed again and the graph is unchanged.
        ``spelled`` is the same tree as the user wrote it before its values were typed,
        where that differs (``-drive``'s are all strings): file names show the options as
        QEMU holds them (see :meth:`BlockNode.refresh_filename`).
        """
        created: list[BlockNode] = []
        try:
            node = self._open(options, None, inactive, created, spelled)
        except BaseException:
            for node in reversed(created):
                self._destroy(node, flush=False)
            raise
        node.monitor_owned = True
        return node

    def _open(self, options: Mapping[str, Any], inherited: NodeOptions | None, force_inactive: bool,
              created: list[BlockNode], spelled: Mapping[str, Any] | None = None) -> BlockNode:
        drv_name = options["driver"]
        factory = self.drivers.get(drv_name)
        if factory is None:
            raise BlockError(f"Driver '{drv_name}' is not supported by qmp-server")
        generic = self._generic_options(options, inherited)
        inactive = force_inactive or options.get("active", True) is False
        driver = factory()
        file_edge_target: BlockNode | None = None
        if not driver.protocol:
            file_ref = options.get("file")
            if file_ref is None:
                raise BlockError("Parameter 'file' is missing")
            file_edge_target = self._child_node(file_ref, generic, inactive, created, backing=False,
                                                spelled=_spelled_child(spelled, "file"))
        name = options.get("node-name")
        if name is None:
            name = self._generate_name()
            implicit = True
        else:
            self._check_name(name)
            implicit = False
        node = BlockNode(name=name, driver=driver, options=generic, inactive=inactive, implicit=implicit)
        driver.set_inactive(inactive)
        driver_options = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
        if driver.protocol and "cache" in options:
            driver_options["cache"] = options["cache"]
        if file_edge_target is not None:
            self._attach(node, file_edge_target, "file", driver.file_role_for(driver_options))
            driver.file = file_edge_target
        try:
            self._open_driver(node, driver_options)
        except BaseException:
            self._detach_all(node)
            raise
        self._driver_options[node] = driver_options
        node.open_options = _open_options(options, spelled)
        # bdrv_open_common: the file name is the ``filename`` option (protocol drivers).
        filename = node.open_options.get("filename")
        node.exact_filename = node.refreshed_filename = filename if isinstance(filename, str) else ""
        self.nodes[name] = node
        BlockNode.changes += 1
        created.append(node)
        if driver.supports_backing:
            self._open_backing(node, options, inactive, created, _spelled_child(spelled, "backing"))
        elif isinstance(options.get("backing"), BackingOptions):
            # bdrv_open_backing_file on a node whose driver has no backing child.
            raise BlockError("Driver doesn't support backing files", errno.EINVAL)
        self.refresh_filenames([node])
        return node

    def _open_driver(self, node: BlockNode, driver_options: dict[str, Any]) -> None:
        try:
            node.driver.open(driver_options, read_only=node.options.read_only, inactive=node.inactive)
        except BlockError as err:
            # auto-read-only: fall back to read-only when the image cannot be written.
            if not (node.options.auto_read_only and not node.options.read_only
                    and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM)):
                raise
            node.options.read_only = True
            node.driver.open(driver_options, read_only=True, inactive=node.inactive)

    def _generic_options(self, options: Mapping[str, Any], inherited: NodeOptions | None) -> NodeOptions:
        base = inherited if inherited is not None else NodeOptions()
        cache = options.get("cache", {})
        generic = NodeOptions(
            read_only=options.get("read-only", base.read_only),
            auto_read_only=options.get("auto-read-only", base.auto_read_only),
            force_share=options.get("force-share", base.force_share if inherited else False),
            cache_direct=cache.get("direct", base.cache_direct),
            cache_no_flush=cache.get("no-flush", base.cache_no_flush),
            discard_unmap=options.get("discard", "unmap" if base.discard_unmap else "ignore") == "unmap",
            detect_zeroes=options.get("detect-zeroes", "off"),
        )
        if generic.force_share and not generic.read_only:
            raise BlockError("force-share=on can only be used with read-only images")
        if generic.detect_zeroes == "unmap" and not generic.discard_unmap:
            raise BlockError("setting detect-zeroes to unmap is not allowed without setting discard "
                             "operation to unmap")
        return generic

    def _child_node(self, ref: Any, parent_options: NodeOptions, inactive: bool,
                    created: list[BlockNode], *, backing: bool,
                    spelled: Mapping[str, Any] | None = None) -> BlockNode:
        if isinstance(ref, str):
            node = self.nodes.get(ref)
            if node is None:
                raise BlockError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        inherited = NodeOptions(
            read_only=True if backing else parent_options.read_only,
            auto_read_only=parent_options.auto_read_only,
            force_share=parent_options.force_share,
            cache_direct=parent_options.cache_direct,
            cache_no_flush=parent_options.cache_no_flush,
            # bdrv_inherited_options: children default to discard=unmap whatever the
            # parent says, because the parent's own policy already filtered the request.
            discard_unmap=True,
        )
        return self._open(ref, inherited, inactive, created, spelled)

    def _open_backing(self, node: BlockNode, options: Mapping[str, Any], inactive: bool,
                      created: list[BlockNode], spelled: Mapping[str, Any] | None) -> None:
        request = node.driver.backing_request()
        # qcow2_do_open: both start as the header's name.
        node.backing_file = node.auto_backing_file = request.filename if request is not None else ""
        ref = options.get("backing")
        if "backing" in options and ref is None:
            return
        if ref is None and request is None:
            return
        try:
            if isinstance(ref, BackingOptions):
                typed, spelled = ref.open_options(self._backing_spec(request, ref.options))
                child = self._child_node(typed, node.options, inactive, created, backing=True,
                                         spelled=spelled)
            elif ref is not None:
                child = self._child_node(ref, node.options, inactive, created, backing=True,
                                         spelled=spelled)
            else:
                assert request is not None
                child = self._child_node(self._backing_spec(request, {}), node.options, inactive,
                                         created, backing=True)
        except BlockError as err:
            # bdrv_open_backing_file prefixes whatever opening the backing node said, once
            # per level of the chain.
            raise BlockError(f"Could not open backing file: {err.message}", err.errno) from err
        if ref is None:
            # bdrv_open_backing_file: a backing node opened as the header says is what the
            # header means, whatever its file name (implicit_backing). Options given for
            # it (BackingOptions) make it an explicit one: auto_backing_file stays.
            node.auto_backing_file = child.filename
        self._attach(node, child, "backing", ChildRole.COW)
        node.driver.backing = child

    def _backing_spec(self, request: BackingRequest | None, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options bdrv_open_backing_file opens a backing node with: the header's file
        name (bdrv_fill_options: a protocol prefix such as file: or null-co:// names the
        protocol node), its backing format or else the probed one, and ``given`` (a
        -drive's ``backing.*``) over them. A ``file.filename`` given replaces the
        header's file; the format is still the header's unless ``driver`` is given."""
        file_given = given.get("file")
        has_filename = isinstance(file_given, Mapping) and "filename" in file_given
        if request is None and not has_filename:
            # No file name from anywhere (bdrv_fill_options, then bdrv_open_inherit).
            if "driver" not in given:
                raise BlockError("Must specify either driver or file", errno.EINVAL)
            factory = self.drivers.get(str(given["driver"]))
            if factory is not None and not factory().protocol:
                raise BlockError('A block device must be specified for "file"', errno.EINVAL)
            return dict(given)
        if has_filename:
            assert isinstance(file_given, Mapping)
            # An option filename is the file driver's, its protocol prefix not parsed
            # (bdrv_find_protocol without allow_protocol_prefix).
            protocol: dict[str, Any] = {"driver": "file", **file_given}
            spec = {k: v for k, v in given.items() if k != "file"}
        else:
            assert request is not None
            if request.filename.startswith("json:"):
                return _merged(self._json_backing(request.filename, request.format), given)
            protocol = protocol_options(request.path)
            spec = dict(given)
        fmt = given.get("driver") or (request.format if request is not None else None)
        if fmt is None:
            path = protocol.get("filename")
            fmt = "raw"
            if protocol["driver"] == "file" and isinstance(path, str):
                fmt = self._probe_format(path)
        spec.pop("driver", None)
        if has_filename:
            return {"driver": fmt, "file": protocol, **spec}
        return _merged({"driver": fmt, "file": protocol}, spec)

    def _json_backing(self, filename: str, fmt: str | None) -> dict[str, Any]:
        """Blockdev options from a ``json:{...}`` backing file name (parse_json_filename).

        Only plain trees are taken: a format node (``driver`` one of ours, else the
        header's backing format, else probed) over a ``file`` node, given nested or with
        dotted keys (``file.filename``), or a bare ``filename`` for the file node.
        """
        try:
            tree = json.loads(filename[len("json:"):])
        except ValueError as err:
            raise BlockError(f"Could not parse the JSON options: {err}", errno.EINVAL) from err
        if not isinstance(tree, dict):
            raise BlockError("Invalid JSON object given", errno.EINVAL)
        options: dict[str, Any] = {}
        for key, value in tree.items():  # dotted keys to nested dicts (qdict_crumple)
            parts = str(key).split(".")
            target = options
            for part in parts[:-1]:
                nested = target.setdefault(part, {})
                if not isinstance(nested, dict):
                    raise BlockError(f"Invalid option '{key}'", errno.EINVAL)
                target = nested
            target[parts[-1]] = value
        if "filename" in options and "file" not in options and options.get("driver") != "file":
            options["file"] = {"driver": "file", "filename": options.pop("filename")}
        if options.get("driver") == "file":
            options = {"file": options}
        file_ref = options.get("file")
        if isinstance(file_ref, dict):
            file_ref.setdefault("driver", "file")
        if "driver" not in options:
            path = file_ref.get("filename") if isinstance(file_ref, dict) else None
            options["driver"] = fmt or (self._probe_format(path) if isinstance(path, str) else "raw")
        return options

    @staticmethod
    def _probe_format(path: str) -> str:
        try:
            return probe_format(path)
        except OSError as err:
            raise BlockError(f"Could not open '{path}': {os.strerror(err.errno or 0)}", err.errno) from err

    # File names -------------------------------------------------------------------------

    def refresh_filenames(self, changed: list[BlockNode]) -> None:
        """Bring the file names of ``changed`` and of every node above them up to date,
        children before parents (a node's name holds its children's options).

        QEMU refreshes a node's name (bdrv_refresh_filename) whenever it reports it; the
        graph does it whenever a name could change instead (opening, overlays, an image
        header naming another backing file), so every name is always current.
        """
        affected: dict[BlockNode, None] = {}  # nodes hash by identity; kept in order
        pending = list(changed)
        while pending:
            node = pending.pop()
            if node not in affected:
                affected[node] = None
                pending.extend(e.parent for e in node.parents if e.parent is not None)
        done: set[BlockNode] = set()
        for start in affected:
            stack: list[tuple[BlockNode, bool]] = [(start, False)]
            while stack:
                node, expanded = stack.pop()
                if node in done:
                    continue
                if not expanded:
                    stack.append((node, True))
                    stack.extend((e.child, False) for e in node.children
                                 if e.child in affected and e.child not in done)
                    continue
                done.add(node)
                # No touch() needed for cached queries: whatever changed a name touched a
                # node below it, and an entry's stamp holds its children's.
                node.refresh_filename(self.filename_json)

    def _reread_backing_name(self, node: BlockNode) -> None:
        # qcow2_do_open on activation: when the header names another backing file than it
        # did, both bs->backing_file and auto_backing_file take the new name.
        if not node.driver.supports_backing or node.driver.ejected:
            return
        request = node.driver.backing_request()
        name = request.filename if request is not None else ""
        if name != node.backing_file:
            node.backing_file = node.auto_backing_file = name
            self.refresh_filenames([node])

    # Edges and permissions ------------------------------------------------------------

    def _attach(self, parent: BlockNode, child: BlockNode, name: str, role: ChildRole) -> Edge:
        if child.inactive and not parent.inactive:
            raise BlockError(f"Inactive '{child.name}' can't be a {name} child of active '{parent.name}'")
        if self._reaches(child, parent):
            raise BlockError(f"Making '{child.name}' a {name} child of '{parent.name}' would create a cycle")
        perm, shared = parent.cumulative_perms()
        nperm, nshared = self._child_perm(parent, child, role, perm, shared)
        edge = Edge(child=child, name=name, role=role, perm=nperm, shared=nshared, parent=parent)
        parent.children.append(edge)
        child.parents.insert(0, edge)
        parent.touch()
        try:
            self.refresh_perms([child])
        except BlockError:
            parent.children.remove(edge)
            child.parents.remove(edge)
            raise
        return edge

    def _reaches(self, start: BlockNode, target: BlockNode) -> bool:
        if start is target:
            return True
        return any(self._reaches(e.child, target) for e in start.children)

    @staticmethod
    def _child_perm(parent: BlockNode, child: BlockNode, role: ChildRole, perm: int,
                    shared: int) -> tuple[int, int]:
        nperm, nshared = child_permissions(role, perm, shared, writable=parent.writable,
                                           inactive=parent.inactive)
        nperm, nshared = parent.driver.child_perm(perm, nperm, nshared)
        if child.options.force_share:
            nshared = ALL
        return nperm, nshared

    def add_user(self, node: BlockNode, user: str, perm: int = 0, shared: int = ALL) -> Edge:
        """Attach an outside user (QEMU: a BlockBackend) asking ``perm``/``shared``."""
        if node.inactive and perm & ~CONSISTENT_READ:
            raise BlockError(f"Permission '{perm_names(perm)}' unavailable on inactive node")
        edge = Edge(child=node, name="root", role=ChildRole.DATA, perm=perm, shared=shared, user=user)
        node.parents.insert(0, edge)
        try:
            self.refresh_perms([node])
        except BlockError:
            node.parents.remove(edge)
            raise
        return edge

    def set_user_perm(self, edge: Edge, perm: int, shared: int) -> None:
        """Change what a user asks; on conflict nothing changes."""
        old = edge.perm, edge.shared
        edge.perm, edge.shared = perm, shared
        try:
            self.refresh_perms([edge.child])
        except BlockError:
            edge.perm, edge.shared = old
            raise

    def remove_user(self, edge: Edge) -> None:
        """Detach a user; its permissions are released."""
        edge.child.parents.remove(edge)
        self._loosen([edge.child])

    def _loosen(self, nodes: list[BlockNode]) -> None:
        # Only restrictions are lifted, so failure would be a bug in a driver: log it.
        try:
            self.refresh_perms(nodes)
        except BlockError as err:
            log.warning("permission update after detaching failed: %s", err)

    def _subtree_order(self, roots: list[BlockNode]) -> list[BlockNode]:
        order: list[BlockNode] = []
        seen: set[BlockNode] = set()  # nodes hash by identity

        def visit(node: BlockNode) -> None:
            seen.add(node)
            for edge in node.children:
                if edge.child not in seen:
                    visit(edge.child)
            order.append(node)

        for root in roots:
            if root not in seen:
                visit(root)
        order.reverse()  # every node before its children
        return order

    def refresh_perms(self, roots: list[BlockNode]) -> None:
        """Recompute permissions below ``roots`` as one transaction.

        Either every affected driver takes its new permissions (locks), or none does and
        the graph's edges are as before; the error is QEMU's text for the first conflict.
        """
        # Edges hash by identity; this runs for every node of every activation.
        new_edges: dict[Edge, tuple[int, int]] = {}
        prepared: list[tuple[BlockNode, int, int]] = []
        try:
            for node in self._subtree_order(roots):
                parents = [(edge, *new_edges.get(edge, (edge.perm, edge.shared)))
                           for edge in node.parents]
                if len(parents) > 1:
                    self._check_conflicts(node, parents)
                perm, shared = 0, ALL
                for _, p, s in parents:
                    perm |= p
                    shared &= s
                if perm & (WRITE | WRITE_UNCHANGED) and not node.writable:
                    raise BlockError("Block node is read-only")
                node.driver.perm_prepare(perm, shared)
                prepared.append((node, perm, shared))
                for edge in node.children:
                    new_edges[edge] = (edge.fixed_perm if edge.fixed_perm is not None else
                                       self._child_perm(node, edge.child, edge.role, perm, shared))
        except BlockError:
            for node, _, _ in reversed(prepared):
                node.driver.perm_abort()
            raise
        for node, perm, shared in prepared:
            for edge in node.children:
                edge.perm, edge.shared = new_edges[edge]
            node.driver.perm_commit(perm, shared)

    @staticmethod
    def _check_conflicts(node: BlockNode, parents: list[tuple[Edge, int, int]]) -> None:
        for a, _, a_shared in parents:
            for b, b_perm, _ in parents:
                if a is not b and b_perm & ~a_shared:
                    raise BlockError(
                        f"Permission conflict on node '{node.name}': permissions "
                        f"'{perm_names(b_perm & ~a_shared)}' are both required by "
                        f"{b.describe_parent()} (uses node '{node.name}' as '{b.name}' child) "
                        f"and unshared by {a.describe_parent()} (uses node '{node.name}' as "
                        f"'{a.name}' child).")

    # Deleting -----------------------------------------------------------------------

    def delete(self, name: str) -> None:
        """``blockdev-del``: QEMU's checks in QEMU's order, then close the node tree."""
        node = self.lookup(name)
        if not node.under_job_filter and any(e.parent is None and not e.job for e in node.parents):
            raise BlockError(f"Node {name} is in use")
        if not node.monitor_owned:
            raise BlockError(f"Node {name} is not owned by the monitor")
        self.check_not_backing(node)
        if node.parents:
            raise BlockError(f"Block device {name} is in use")
        node.monitor_owned = False
        self._release(node)

    def release(self, node: BlockNode) -> None:
        """Close ``node`` (and its orphaned children) if nothing holds it any more."""
        self._release(node)

    def _release(self, node: BlockNode) -> None:
        """Close ``node`` if nothing holds it any more, then its orphaned children."""
        if node.monitor_owned or node.parents:
            return
        children = [edge.child for edge in node.children]
        self._destroy(node, flush=True)
        for child in children:
            self._release(child)

    def _destroy(self, node: BlockNode, *, flush: bool) -> None:
        if flush and node.writable:
            try:
                node.driver.inactivate()
            except BlockError as err:
                log.warning("flushing %s on close failed: %s", node.name, err)
        node.driver.close()
        self._driver_options.pop(node, None)
        children = [edge.child for edge in node.children]
        self._detach_all(node)
        if self.nodes.get(node.name) is node:
            del self.nodes[node.name]
            BlockNode.changes += 1
        self._loosen([child for child in children if child.name in self.nodes])

    def _detach_all(self, node: BlockNode) -> None:
        node.touch()
        for edge in node.children:
            if edge in edge.child.parents:
                edge.child.parents.remove(edge)
        node.children.clear()

    def close_all(self) -> None:
        """Close every node (process exit): active images are flushed and marked clean."""
        for node in reversed(list(self.nodes.values())):
            if self.nodes.get(node.name) is node:
                self._destroy(node, flush=True)

    # Overlays (external snapshots) ----------------------------------------------------

    def check_not_backing(self, node: BlockNode) -> None:
        """QEMU's op blockers (bdrv_op_is_blocked): a block job's (the newest, so named
        first), else the one on backing nodes (bdrv_set_backing_hd blocks most
        operations on the new backing node, deletion and external snapshots among them)."""
        self.check_no_job(node)
        for edge in node.parents:
            if edge.parent is not None and edge.name == "backing":
                raise BlockError(f"Node '{node.name}' is busy: node is used as backing hd of "
                                 f"'{edge.parent.name}'")

    def check_no_job(self, node: BlockNode) -> None:
        """A block job's op blocker on ``node``, with QEMU's text (the node named as
        bdrv_get_device_or_node_name names it)."""
        if node.blockers:
            name = self.device_name(node) or node.name
            raise BlockError(f"Node '{name}' is busy: {node.blockers[0]}")

    def is_root(self, node: BlockNode) -> bool:
        """QEMU's bdrv_is_root_node: only outside users (BlockBackends, no job) use it."""
        return all(e.parent is None and not e.job for e in node.parents)

    def set_backing(self, node: BlockNode, backing: BlockNode | None) -> None:
        """QEMU's bdrv_set_backing_hd: ``node`` reads through ``backing`` (None: no backing
        child) from now on; the nodes that only the old backing child kept open close.

        Only the graph changes: the image's own backing file name is the caller's
        (:meth:`BlockDriver.change_backing_file`).
        """
        old = node.child("backing")
        if old is not None and old.child is backing:
            return
        if backing is not None:
            if backing.inactive and not node.inactive:
                raise BlockError(f"Inactive '{backing.name}' can't be a backing child of active "
                                 f"'{node.name}'")
            if self._reaches(backing, node):
                raise BlockError(f"Making '{backing.name}' a backing child of '{node.name}' would "
                                 f"create a cycle")
        if old is not None:
            node.children.remove(old)
            old.child.parents.remove(old)
        node.driver.backing = None
        node.touch()
        if backing is not None:
            self._attach(node, backing, "backing", ChildRole.COW)
            node.driver.backing = backing
        if old is not None:
            old.child.touch()
            self._release(old.child)
            if old.child.name in self.nodes:
                self._loosen([old.child])
        self.refresh_filenames([node])

    def reopen_read_write(self, node: BlockNode) -> None:
        """QEMU's bdrv_reopen_set_read_only(bs, false): ``node`` and the file node opened
        with it become writable (a block job writes into a backing node). A failure
        leaves both as they were, with QEMU's text."""
        if not node.options.read_only or node.driver.ejected:
            return
        members = [node]
        for edge in node.children:
            if edge.name == "file" and edge.child.implicit:
                members.append(edge.child)
        protocols = [m for m in members if m.driver.protocol and m.options.read_only]
        prepared: list[BlockNode] = []
        try:
            for member in protocols:
                member.driver.reopen_prepare(False)
                prepared.append(member)
        except BaseException:
            for member in prepared:
                member.driver.reopen_abort()
            raise
        for member in prepared:
            member.driver.reopen_commit()
            member.options.read_only = False
            member.touch()
        for member in members:
            if member.driver.protocol or not member.options.read_only:
                continue
            driver_options = self._driver_options.get(member, {})
            member.driver.close()
            try:
                member.driver.open(driver_options, read_only=False, inactive=member.inactive)
            except BlockError:
                member.driver.open(driver_options, read_only=True, inactive=member.inactive)
                raise
            member.options.read_only = False
            member.touch()

    def append_overlay(self, overlay: BlockNode, old: BlockNode) -> list[Edge]:
        """QEMU's bdrv_append: ``old`` becomes the backing child of ``overlay``, and every
        other user of ``old`` (parent nodes and outside users alike) uses ``overlay``.

        One permission transaction: on a conflict (QEMU's text) the graph is as before.
        The caller made QEMU's checks on the overlay (external_snapshot_prepare). Returns
        the edges that moved, for :meth:`remove_overlay`.
        """
        if old.inactive and not overlay.inactive:
            raise BlockError(f"Inactive '{old.name}' can't be a backing child of active '{overlay.name}'")
        if self._reaches(old, overlay):
            raise BlockError(f"Making '{old.name}' a backing child of '{overlay.name}' would create a cycle")
        moved = list(old.parents)
        edge = Edge(child=old, name="backing", role=ChildRole.COW, parent=overlay)
        overlay.children.append(edge)
        old.parents = [edge]
        for parent_edge in moved:
            parent_edge.child = overlay
            if parent_edge.parent is not None:
                parent_edge.parent.touch()
        overlay.parents = moved + overlay.parents
        overlay.driver.backing = old
        overlay.touch()
        old.touch()
        try:
            self.refresh_perms([overlay])
        except BlockError:
            overlay.driver.backing = None
            overlay.children.remove(edge)
            overlay.parents = overlay.parents[len(moved):]
            for parent_edge in moved:
                parent_edge.child = old
            old.parents = moved
            self._loosen([old, overlay])
            raise
        # The overlay's name now compares its header with the old top's name; the users
        # moved up see the overlay's.
        self.refresh_filenames([overlay])
        return moved

    def remove_overlay(self, overlay: BlockNode, old: BlockNode, moved: list[Edge]) -> None:
        """Undo :meth:`append_overlay` (external_snapshot_abort): the moved users go back
        to ``old`` and the overlay loses its backing child. Only loosens permissions."""
        edge = overlay.child("backing")
        if edge is not None:
            overlay.children.remove(edge)
            if edge in old.parents:
                old.parents.remove(edge)
        overlay.driver.backing = None
        for parent_edge in moved:
            if parent_edge in overlay.parents:
                overlay.parents.remove(parent_edge)
            parent_edge.child = old
            old.parents.append(parent_edge)
            if parent_edge.parent is not None:
                parent_edge.parent.touch()
        overlay.touch()
        old.touch()
        self._loosen([old, overlay])
        self.refresh_filenames([overlay, old])

    def replace_node(self, old: BlockNode, new: BlockNode) -> None:
        """QEMU's bdrv_replace_node as a mirror job's completion uses it (active commit's
        pivot): every user of ``old`` except block jobs (child_job stays at its node)
        uses ``new`` instead, in one permission transaction; on a conflict (QEMU's text)
        nothing changed. ``old`` closes if nothing holds it any more, and with it the
        nodes only it kept open."""
        moved = [edge for edge in old.parents
                 if not edge.job and (edge.parent is None or not self._reaches(new, edge.parent))]
        for edge in moved:
            old.parents.remove(edge)
            edge.child = new
            new.parents.insert(0, edge)
            if edge.parent is not None:
                edge.parent.touch()
        old.touch()
        new.touch()
        try:
            self.refresh_perms([old, new])
        except BlockError:
            for edge in moved:
                new.parents.remove(edge)
                edge.child = old
                old.parents.append(edge)
            self._loosen([new])
            raise
        # The old node's own needs of its children change with its users: one
        # transaction over both subtrees.
        self._loosen([old, new])
        self.refresh_filenames([new])
        self._release(old)

    def set_read_only(self, node: BlockNode) -> None:
        """QEMU's bdrv_reopen_set_read_only(bs, true), as external_snapshot_commit uses it.

        Children created with the node inherit the flag (named ones keep their own, as in
        QEMU's reopen queue). A writable format node first stores its persistent bitmaps
        and marks its image clean (qcow2_reopen_prepare), then reopens read-only. Errors
        are the caller's to ignore, as QEMU does.
        """
        if node.options.read_only or node.driver.ejected:
            return
        members = [node]
        for member in members:  # bounded by the subtree: each node is added once
            for edge in member.children:
                if edge.name == "file" and edge.child.implicit and edge.child not in members:
                    members.append(edge.child)
        for member in members:
            member.flush()
        # The protocol nodes first get descriptors opened read-only (raw_check_perm in
        # bdrv_reopen_multiple): if one cannot be (an fd set without a read-only member),
        # the whole reopen fails before any node changed, as QEMU's transaction does.
        protocols = [m for m in members if m.driver.protocol and not m.options.read_only]
        prepared: list[BlockNode] = []
        try:
            for member in protocols:
                member.driver.reopen_prepare(True)
                prepared.append(member)
            self._reopen_formats_read_only(members)
        except BaseException:
            for member in prepared:
                member.driver.reopen_abort()
            raise
        for member in prepared:
            member.driver.reopen_commit()
            member.options.read_only = True
            member.touch()
        self._loosen(members)

    def _reopen_formats_read_only(self, members: list[BlockNode]) -> None:
        for member in members:
            if member.options.read_only or member.driver.protocol:
                continue
            if not member.driver.protocol and member.writable:
                member.driver.inactivate()
                member.driver.close()
                driver_options = self._driver_options.get(member, {})
                try:
                    member.driver.open(driver_options, read_only=True, inactive=member.inactive)
                except BlockError:
                    # A failed reopen leaves the node as it was (QEMU's reopen is a
                    # transaction): open it read-write again, then report the failure.
                    member.driver.open(driver_options, read_only=False, inactive=member.inactive)
                    raise
            member.options.read_only = True
            member.touch()

    # Activation -----------------------------------------------------------------------

    def activate(self, node: BlockNode) -> None:
        """QEMU's bdrv_activate: children first, take permissions, drop cached metadata.

        On failure the node stays (or becomes again) inactive and nothing was written.
        """
        if node.driver.ejected:
            # bdrv_activate returns -ENOMEDIUM for a node without a driver but sets no
            # error, so cont and blockdev-set-active succeed (QEMU 7.2, checked live).
            return
        for edge in node.children:
            self.activate(edge.child)
        if not node.inactive:
            return
        node.inactive = False
        node.driver.set_inactive(False)
        try:
            self.refresh_perms([node])
            node.driver.invalidate_cache()
            for bitmap in node.dirty_bitmaps:
                bitmap.skip_store = False  # bdrv_activate: stored again from now on
            # bdrv_activate: the parents (BlockBackends) ask for their permissions again.
            for edge in list(node.parents):
                if edge.activate_hook is not None:
                    edge.activate_hook()
        except BlockError:
            node.inactive = True
            node.driver.set_inactive(True)
            self._loosen([node])
            raise
        finally:
            node.touch()
        self._reread_backing_name(node)
        self._prefetch_for_parents(node)

    @staticmethod
    def _prefetch_for_parents(node: BlockNode) -> None:
        # The format nodes above are about to re-read their metadata from this freshly
        # invalidated node: let it start fetching exactly that (see FileDriver.prefetch).
        ranges = [r for e in node.parents if e.parent is not None and e.name == "file"
                  for r in e.parent.driver.metadata_ranges()]
        if ranges:
            node.driver.prefetch(ranges)

    def activate_all(self) -> None:
        """Activate every node, children before parents; stops at the first failure.

        All nodes of one height go before any node above them (every file before any
        format node), so that the page-cache drop and read-ahead of all images happen
        before the format drivers re-read their metadata, instead of disk by disk.
        """
        height: dict[int, int] = {}

        def measure(node: BlockNode) -> int:
            if id(node) not in height:
                height[id(node)] = 1 + max((measure(e.child) for e in node.children), default=-1)
            return height[id(node)]

        nodes = list(self.nodes.values())
        for node in sorted(nodes, key=measure):
            self.activate(node)

    def inactivate(self, node: BlockNode) -> None:
        """``blockdev-set-active false`` on one node (QEMU's bdrv_inactivate)."""
        if node.has_active_parent():
            raise BlockError("Node has active parent node")
        self._inactivate(node)

    def inactivate_all(self) -> None:
        """Flush and inactivate every node, parents before children."""
        for node in self.top_nodes():
            self._inactivate(node)

    def _inactivate(self, node: BlockNode) -> None:
        # A node stays active while an active parent still uses it.
        if node.has_active_parent() or node.inactive:
            return
        if node.driver.protocol:
            # Protocol nodes hold no metadata: inactivating them is a flush, which is
            # skipped when the parent's flush already covered everything written.
            node.flush()
        else:
            node.driver.inactivate()
            node.flushed_gen = node.write_gen
        # bdrv_inactivate_recurse: parents that can (device BlockBackends) let go first.
        for edge in node.parents:
            if edge.inactivate_hook is not None and not edge.inactivate_hook():
                raise BlockError("Failed to inactivate node: Operation not permitted", errno.EPERM)
        perm, _ = node.cumulative_perms()
        if perm & (WRITE | WRITE_UNCHANGED):
            # An outside user still needs to write (QEMU: -EPERM).
            raise BlockError("Failed to inactivate node: Operation not permitted", errno.EPERM)
        node.inactive = True
        node.touch()
        self._loosen([node])
        node.driver.set_inactive(True)
        for edge in node.children:
            self._inactivate(edge.child)

    def invalidate_cache(self, node: BlockNode) -> None:
        """Re-read cached metadata of ``node`` and its children (inactive nodes: skipped).

        Everything dirty is written back first, parents before children, so no child drops
        its cache while a parent above it still holds unwritten metadata.
        """
        for member in self._subtree_order([node]):
            member.flush()
        self._invalidate(node)

    def _invalidate(self, node: BlockNode) -> None:
        for edge in node.children:
            self._invalidate(edge.child)
        if node.inactive:
            return
        node.touch()
        node.driver.invalidate_cache()
        self._reread_backing_name(node)
        self._prefetch_for_parents(node)

    def flush_all(self) -> None:
        """Flush every node, parents first so their caches reach the children."""
        for node in self._subtree_order(self.top_nodes()):
            node.flush()

    def iter_nodes(self) -> Iterator[BlockNode]:
        """Every node, newest name first (QEMU's listing order)."""
        return reversed(list(self.nodes.values()))
