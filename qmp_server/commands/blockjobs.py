"""Block job commands: block-stream, block-commit, query-block-jobs and block-job-*
(QEMU's blockdev.c qmp_block_stream / qmp_block_commit and job-qmp.c's block-job verbs).

The argument checks run in QEMU's order with QEMU's texts, under the graph lock; the
job itself is :mod:`qmp_server.blockjobs`'.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from blocklayer import blockjob as BJ
from blocklayer.node import BlockNode
from blocklayer.perm import WRITE

from ..backuprequest import backup_common, create_target, open_target, start_drive_backup
from ..blockjobs import BackupRequest, CommitRequest, MirrorRequest, StreamRequest
from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError
from .lookup import find_bs, lookup_bs

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


@table.query("query-block-jobs")
def query_block_jobs(machine: Machine) -> list[dict[str, Any]]:
    """Every block job, newest first (qmp_query_block_jobs)."""
    return machine.blockjobs.query()


def _stream_request(machine: Machine, args: dict[str, Any]) -> StreamRequest:
    # qmp_block_stream's checks, in its order.
    if "base" in args and "base-node" in args:
        raise QMPError("'base' and 'base-node' cannot be specified at the same time")
    if "base" in args and "bottom" in args:
        raise QMPError("'base' and 'bottom' cannot be specified at the same time")
    if "bottom" in args and "base-node" in args:
        raise QMPError("'bottom' and 'base-node' cannot be specified at the same time")
    device: str = args["device"]
    top = lookup_bs(machine, device, device)
    base: BlockNode | None = None
    bottom: BlockNode | None = None
    if "base" in args:
        base = BJ.find_backing_image(top, args["base"])
        if base is None:
            raise QMPError(f"Can't find '{args['base']}' in the backing chain")
    if "base-node" in args:
        base = lookup_bs(machine, None, args["base-node"])
        if base is top or not BJ.chain_contains(top, base):
            raise QMPError(f"Node '{args['base-node']}' is not a backing image of '{device}'")
    if "bottom" in args:
        bottom = lookup_bs(machine, None, args["bottom"])
        if bottom.driver.ejected:
            raise QMPError(f"Node '{args['bottom']}' is not open")
        if not BJ.chain_contains(top, bottom):
            raise QMPError(f"Node '{args['bottom']}' is not in a chain starting from '{device}'")
    # The op blockers of the chain between the node and the base (or below the bottom).
    end = BJ.backing(bottom) if bottom is not None else base
    for node in BJ.chain(top):
        if node is end:
            break
        machine.block.graph.check_no_job(node)
    if base is None and "backing-file" in args:
        raise QMPError("backing file specified, but streaming the entire chain")
    return StreamRequest(job_id=args.get("job-id"), top=top, base=base, bottom=bottom,
                         backing_file=args.get("backing-file"), speed=args.get("speed", 0),
                         auto_finalize=args.get("auto-finalize", True),
                         auto_dismiss=args.get("auto-dismiss", True))


@table.command("block-stream")
async def block_stream(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Copy the backing chain's data (down to a base) into a node, then drop the chain."""
    machine = ctx.machine
    request = await machine.block.run_light(_stream_request, machine, args)
    await machine.blockjobs.stream(request)


def _root_bs(machine: Machine, device: str) -> BlockNode:
    # qmp_get_root_bs, with block-commit's DeviceNotFound for a name that means nothing
    # (libvirt probes for it).
    node = find_bs(machine, device, device)
    if node is None:
        try:
            lookup_bs(machine, device, device)
        except QMPError as err:
            if "has no medium" in err.desc:
                raise
        raise QMPError(f"Device '{device}' not found", "DeviceNotFound")
    return _checked_root(machine, node)


def _checked_root(machine: Machine, node: BlockNode) -> BlockNode:
    # qmp_get_root_bs's checks once the node is found.
    if not machine.block.graph.is_root(node):
        raise QMPError("Need a root block node")
    if node.driver.ejected:
        raise QMPError("Device has no medium")
    return node


def _commit_request(machine: Machine, args: dict[str, Any]) -> CommitRequest:
    # qmp_block_commit's checks, in its order.
    graph = machine.block.graph
    device: str = args["device"]
    root = _root_bs(machine, device)
    graph.check_no_job(root)
    top: BlockNode | None = root
    if "top-node" in args and "top" in args:
        raise QMPError("'top-node' and 'top' are mutually exclusive")
    if "top-node" in args:
        top = lookup_bs(machine, None, args["top-node"])
        if not BJ.chain_contains(root, top):
            raise QMPError(f"'{args['top-node']}' is not in this backing file chain")
    elif args.get("top"):
        if root.filename != args["top"]:
            top = BJ.find_backing_image(root, args["top"])
    if top is None:
        raise QMPError(f"Top image file {args.get('top') or 'NULL'} not found")
    if "base-node" in args and "base" in args:
        raise QMPError("'base-node' and 'base' are mutually exclusive")
    if "base-node" in args:
        base = lookup_bs(machine, None, args["base-node"])
        if not BJ.chain_contains(top, base):
            raise QMPError(f"'{args['base-node']}' is not in this backing file chain")
    elif args.get("base"):
        found = BJ.find_backing_image(top, args["base"])
        if found is None:
            raise QMPError(f"Can't find '{args['base']}' in the backing chain")
        base = found
    else:
        bottom = BJ.find_overlay(top, None)
        if bottom is None:
            raise QMPError("There is no backimg image")
        base = bottom
    for node in BJ.chain(top):
        graph.check_no_job(node)
        if node is base:
            break
    if top is base:
        raise QMPError("cannot commit an image into itself")
    perm, _ = top.cumulative_perms()
    active = bool(perm & WRITE) or top is root
    if active:
        # Active commit (commit_active_start), a mirror job.
        if "backing-file" in args:
            if top is root:
                raise QMPError("'backing-file' specified, but 'top' is the active layer")
            raise QMPError("'backing-file' specified, but 'top' has a writer on it")
    else:
        overlay = BJ.find_overlay(root, top)
        if overlay is not None:
            graph.check_no_job(overlay)
    return CommitRequest(job_id=args.get("job-id"), root=root, top=top, base=base,
                         backing_file=args.get("backing-file"), speed=args.get("speed", 0),
                         auto_finalize=args.get("auto-finalize", True),
                         auto_dismiss=args.get("auto-dismiss", True), active=active)


@table.command("block-commit")
async def block_commit(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Copy the data of the chain from ``top`` down to above ``base`` into ``base``, then
    drop those nodes from the chain."""
    machine = ctx.machine
    request = await machine.block.run_light(_commit_request, machine, args)
    await machine.blockjobs.commit(request)


def _get_root_bs(machine: Machine, name: str) -> BlockNode:
    # qmp_get_root_bs.
    return _checked_root(machine, lookup_bs(machine, name, name))


def _mirror_request(machine: Machine, args: dict[str, Any]) -> MirrorRequest:
    # qmp_blockdev_mirror and blockdev_mirror_common's checks, in their order.
    graph = machine.block.graph
    source = _get_root_bs(machine, args["device"])
    target = lookup_bs(machine, args["target"], args["target"])
    granularity = args.get("granularity", 0)
    if granularity and not 512 <= granularity <= 64 << 20:
        raise QMPError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise QMPError("Parameter 'granularity' expects a power of 2")
    graph.check_no_job(source)
    graph.check_no_job(target)
    sync: str = args["sync"]
    if sync == "top" and BJ.backing(source) is None:
        sync = "full"
    replaces: str | None = args.get("replaces")
    if replaces is not None:
        # check_to_replace_node, then the sizes.
        to_replace = graph.find(replaces)
        if to_replace is None:
            raise QMPError(f"Failed to find node with node-name='{replaces}'")
        graph.check_no_job(to_replace)
        if to_replace not in BJ.filter_chain(source):  # bdrv_recurse_can_replace
            raise QMPError(f"Cannot replace '{replaces}' by a node mirrored from '{source.name}', "
                           "because it cannot be guaranteed that doing so would not lead to an "
                           "abrupt change of visible data")
        if BJ.length(source) != BJ.length(to_replace):
            raise QMPError("cannot replace image with a mirror image of different size")
    if sync in ("incremental", "bitmap"):
        raise QMPError(f"Sync mode '{sync}' not supported")
    return MirrorRequest(job_id=args.get("job-id"), source=source, target=target, replaces=replaces,
                         sync=sync, speed=args.get("speed", 0), granularity=granularity,
                         buf_size=args.get("buf-size", 0),
                         write_blocking=args.get("copy-mode") == "write-blocking",
                         auto_finalize=args.get("auto-finalize", True),
                         auto_dismiss=args.get("auto-dismiss", True))


@table.command("blockdev-mirror")
async def blockdev_mirror(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Copy a node's data into another one, keep them in sync, and on completion put the
    copy where the original was."""
    machine = ctx.machine
    request = await machine.block.run_light(_mirror_request, machine, args)
    await machine.blockjobs.mirror(request)


@table.command("block-job-set-speed")
async def block_job_set_speed(ctx: CommandContext, args: dict[str, Any]) -> None:
    """A new rate limit (bytes a second, 0: none); a sleeping job wakes to use it."""
    ctx.machine.blockjobs.set_speed(args["device"], args["speed"])


@table.command("block-job-cancel")
async def block_job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    """The job stops at its next pause point and aborts (BLOCK_JOB_CANCELLED)."""
    job, _ = ctx.machine.blockjobs.find(args["device"])
    ctx.machine.jobs.cancel(job.id, args.get("force", False))


@table.command("block-job-pause")
async def block_job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    """The job stops at its next pause point until block-job-resume."""
    job, _ = ctx.machine.blockjobs.find(args["device"])
    ctx.machine.jobs.pause(job.id)


@table.command("block-job-resume")
async def block_job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    """A paused job goes on."""
    job, _ = ctx.machine.blockjobs.find(args["device"])
    ctx.machine.jobs.resume(job.id)


@table.command("block-job-complete")
async def block_job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Completes a ready job (active commit: the device's image becomes the base)."""
    job, _ = ctx.machine.blockjobs.find(args["device"])
    ctx.machine.jobs.complete(job.id)


@table.command("block-job-dismiss")
async def block_job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    """A concluded block job (auto-dismiss off) leaves the job lists."""
    job, _ = ctx.machine.blockjobs.find(args["id"])
    ctx.machine.jobs.dismiss(job.id)


@table.command("block-job-finalize")
async def block_job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    """A pending block job (auto-finalize off) changes the graph and concludes."""
    job, _ = ctx.machine.blockjobs.find(args["id"])
    ctx.machine.jobs.finalize(job.id)


def backup_request(machine: Machine, args: dict[str, Any]) -> BackupRequest:
    """blockdev-backup's arguments checked and looked up, QEMU's errors in its order."""
    # blockdev_backup_prepare's lookups, then do_backup_common's checks, in their order.
    source = lookup_bs(machine, args["device"], args["device"])
    target = lookup_bs(machine, args["target"], args["target"])
    return backup_common(args, source, target, args["sync"])


@table.command("blockdev-backup")
async def blockdev_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Copy the source as it is now into the target, while the guest goes on writing."""
    machine = ctx.machine
    request = await machine.block.run_light(backup_request, machine, args)
    await machine.blockjobs.backup(request)


@table.command("drive-backup")
async def drive_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Back up into an image file it creates (or an existing one), as blockdev-backup."""
    machine = ctx.machine
    await start_drive_backup(machine.block, machine.devices, machine.blockjobs, args)


def _drive_mirror_request(machine: Machine, args: dict[str, Any]) -> MirrorRequest:
    """qmp_drive_mirror up to blockdev_mirror_common, under the graph lock: the target
    image created (unless mode existing) and opened without its backing chain, then the
    checks of blockdev-mirror."""
    graph = machine.block.graph
    source = _get_root_bs(machine, args["device"])
    graph.check_no_job(source)  # the early check, before the target is created
    existing = args.get("mode") == "existing"
    fmt: str | None = args.get("format") or (None if existing else source.drv_name)
    below = BJ.backing(BJ.skip_filters(source))
    sync: str = args["sync"]
    if below is None and sync == "top":
        sync = "full"
    if sync == "none":
        below = source
    if "replaces" in args and "node-name" not in args:
        raise QMPError("a node-name must be provided when replacing a named node of the graph")
    path: str = args["target"]
    if not existing:
        plain = sync == "full" or below is None
        assert fmt is not None
        create_target(path, fmt, BJ.length(source), None if plain else below)
    # BDRV_O_NO_BACKING: the mirror sets the backing at the end.
    target = open_target(graph, path, fmt, {"backing": None}, args.get("node-name"))
    try:
        request = _mirror_request(machine, {**args, "target": target.name, "sync": sync})
    except BaseException:
        graph.release(target)
        raise
    # MIRROR_SOURCE_BACKING_CHAIN for a created image; an existing one's own backing
    # chain (MIRROR_OPEN_BACKING_CHAIN) is not opened here.
    return dataclasses.replace(request, target_backing=None if sync == "full" else below,
                               set_target_backing=not existing,
                               zero_target=sync == "full" and existing)


@table.command("drive-mirror")
async def drive_mirror(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Mirror into an image file it creates (or an existing one), as blockdev-mirror."""
    machine = ctx.machine
    request = await machine.block.run(_drive_mirror_request, machine, args)
    try:
        await machine.blockjobs.mirror(request)
    except QMPError:
        await machine.block.run(machine.block.graph.release, request.target)
        raise
