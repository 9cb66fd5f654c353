"""The NBD server and block exports: nbd-server-start/-add/-remove/-stop, block-export-add,
block-export-del, query-block-exports (QEMU's blockdev-nbd.c and block/export/export.c;
the checks in their order, with their texts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocklayer.node import BlockNode

from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError
from ..fdsets import fd_param
from .lookup import lookup_bs

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


@table.command("nbd-server-start")
async def nbd_server_start(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Listen for NBD clients on a UNIX, TCP, vsock or passed socket."""
    machine = ctx.machine
    if machine.nbd.running:
        raise QMPError("NBD server already running")
    creds = args.get("tls-creds")
    if creds is not None:
        # nbd_get_tls_creds: no TLS credentials objects exist here (tls-creds-* cannot
        # be created), so every id is unknown.
        raise QMPError(f"No TLS credentials with id '{creds}'")
    # tls-authz without tls-creds is accepted and unused, as QEMU 7.2 does.
    await machine.nbd.start(args["addr"], args.get("max-connections", 0), fd_param)


@table.command("nbd-server-stop")
async def nbd_server_stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Close every NBD export (BLOCK_EXPORT_DELETED each) and the listener."""
    await ctx.machine.nbd.stop()


async def _export_add(machine: Machine, export_id: str, node: BlockNode, writable: bool,
                      nbd_args: dict[str, Any], allow_inactive: bool = False) -> None:
    # blk_exp_add's checks after the node lookup, then nbd_export_create's (NbdService.add).
    if node.read_only and writable:
        raise QMPError("Cannot export read-only node as writable")
    if "iothread" in nbd_args and machine.objects.find(nbd_args["iothread"]) is None:
        raise QMPError(f"iothread \"{nbd_args['iothread']}\" not found")
    await machine.nbd.add(export_id, node, name=nbd_args.get("name"),
                          description=nbd_args.get("description"), writable=writable,
                          bitmaps=nbd_args.get("bitmaps", []), allow_inactive=allow_inactive)


@table.command("nbd-server-add")
async def nbd_server_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Export ``device`` (a -drive name or a node) under ``name`` (default: ``device``),
    which is also the export's id."""
    machine = ctx.machine
    device: str = args["device"]
    node = lookup_bs(machine, device, device)
    name: str = args.get("name", device)
    # qmp_nbd_server_add: a read-only node is exported read-only, not refused.
    writable = args.get("writable", False) and not node.read_only
    nbd_args: dict[str, Any] = {"name": name}
    if "description" in args:
        nbd_args["description"] = args["description"]
    if "bitmap" in args:
        nbd_args["bitmaps"] = [args["bitmap"]]
    machine.nbd.check_id(name)
    await _export_add(machine, name, node, writable, nbd_args)


@table.command("block-export-add")
async def block_export_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Export a node (``type: nbd``, the only type here) through the NBD server."""
    machine = ctx.machine
    export_id: str = args["id"]
    machine.nbd.check_id(export_id)
    node = lookup_bs(machine, None, args["node-name"])
    await _export_add(machine, export_id, node, args.get("writable", False), args,
                      allow_inactive=args.get("allow-inactive", False))


async def _export_del(machine: Machine, export_id: str, mode: str) -> None:
    await machine.nbd.delete(export_id, hard=mode == "hard")


@table.command("block-export-del")
async def block_export_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Remove an export; ``mode: safe`` (default) refuses while clients are connected."""
    await _export_del(ctx.machine, args["id"], args.get("mode", "safe"))


@table.command("nbd-server-remove")
async def nbd_server_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    """block-export-del for an NBD export, once the server runs."""
    # QEMU 7.2 does not ask whether the server runs: without it there is no export.
    await _export_del(ctx.machine, args["name"], args.get("mode", "safe"))


@table.command("query-block-exports")
async def query_block_exports(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every export, newest first."""
    return ctx.machine.nbd.query()
