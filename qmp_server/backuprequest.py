"""The requests of the backup commands that take a file name (drive-backup, and the
image a drive-mirror target gets): the target image made as bdrv_img_create makes it,
opened, and BackupCommon's members checked, as QEMU's blockdev.c does. Shared by the QMP
command tables and HMP (``drive_backup``); runs under the graph lock."""

from __future__ import annotations

import errno
import os
from typing import Any

from blocklayer import blockjob as BJ
from blocklayer.create import create_overlay_image, create_raw_image
from blocklayer.dirtybitmap import CHECK_ALLOW_RO, BitmapError, DirtyBitmap
from blocklayer.dirtybitmap import find as find_bitmap
from blocklayer.graph import BlockGraph, probe_format
from blocklayer.node import BlockNode

from .blockjobs import BackupRequest, BlockJobs
from .blockservice import BlockService
from .devices import Devices
from .errorreport import info_print
from .errors import QMPError


def backup_common(args: dict[str, Any], source: BlockNode, target: BlockNode, sync: str) -> BackupRequest:
    """do_backup_common's checks of BackupCommon's members, in its order."""
    name: str | None = args.get("bitmap")
    mode: str | None = args.get("bitmap-mode")
    perf = args.get("x-perf", {})
    if sync in ("bitmap", "incremental") and name is None:
        raise QMPError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise QMPError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
        sync, mode = "bitmap", "on-success"
    bitmap: DirtyBitmap | None = None
    if name is not None:
        bitmap = find_bitmap(source.dirty_bitmaps, name)
        if bitmap is None:
            raise QMPError(f"Bitmap '{name}' could not be found")
        if mode is None:
            raise QMPError("Bitmap sync mode must be given when providing a bitmap")
        try:
            bitmap.check(CHECK_ALLOW_RO)
        except BitmapError as err:
            raise QMPError(str(err)) from err
        if sync == "none":
            raise QMPError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise QMPError(f"Bitmap sync mode 'never' has no meaningful effect when combined "
                           f"with sync mode '{sync}'")
    elif mode is not None:
        raise QMPError("Cannot specify bitmap sync mode without a bitmap")
    return BackupRequest(job_id=args.get("job-id"), source=source, target=target, sync=sync,
                         speed=args.get("speed", 0), bitmap=bitmap, bitmap_mode=mode,
                         compress=args.get("compress", False),
                         max_workers=perf.get("max-workers", 64), max_chunk=perf.get("max-chunk", 0),
                         auto_finalize=args.get("auto-finalize", True),
                         auto_dismiss=args.get("auto-dismiss", True))


def create_target(path: str, fmt: str, size: int, backing: BlockNode | None) -> None:
    """bdrv_img_create of a backup or mirror target, its Formatting line on stdout."""
    if fmt == "qcow2":
        create_overlay_image(path, size, backing.filename if backing is not None else None,
                             backing.drv_name if backing is not None else None, info_print)
    elif fmt == "raw":
        if backing is not None:
            raise QMPError("Backing file not supported for file format 'raw'")
        create_raw_image(path, size, info_print)
    else:
        raise QMPError(f"Unknown file format '{fmt}'")


def open_target(graph: BlockGraph, path: str, fmt: str | None, qcow2_options: dict[str, Any],
                node_name: str | None = None) -> BlockNode:
    """bdrv_open of a drive-backup or drive-mirror target: its format probed when not
    given, ``qcow2_options`` for a qcow2 image (its backing), the node the job's, not the
    monitor's (it closes when the job lets go of it, unless a pivot kept it)."""
    try:
        fmt = fmt or probe_format(path)
    except OSError as err:
        raise QMPError(f"Could not open '{path}': {os.strerror(err.errno or errno.EIO)}") from err
    options: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if node_name is not None:
        options["node-name"] = node_name
    if fmt == "qcow2":
        options.update(qcow2_options)
    target = graph.open(options)
    target.monitor_owned = False
    return target


def drive_backup_target(devices: Devices, graph: BlockGraph,
                        args: dict[str, Any]) -> tuple[BlockNode, BlockNode, str]:
    """drive_backup_prepare up to the target's open, under the graph lock: (the source, the
    target node, the sync mode once ``top`` of a node without backing became ``full``).
    The image is created as bdrv_img_create does, its ``Formatting`` line on stdout."""
    source = devices.lookup_bs(args["device"], args["device"])
    if source.driver.ejected:
        raise QMPError("Device has no medium")
    existing = args.get("mode") == "existing"
    fmt: str | None = args.get("format") or (None if existing else source.drv_name)
    graph.check_no_job(source)
    sync: str = args["sync"]
    below: BlockNode | None = None
    if sync == "top":
        below = BJ.backing(BJ.skip_filters(source))
        if below is None:
            sync = "full"
    elif sync == "none":
        below = source
    path: str = args["target"]
    if not existing:
        assert fmt is not None
        create_target(path, fmt, BJ.length(source), below)
    # BDRV_O_NO_BACKING, then bdrv_set_backing_hd(target, source) for sync none.
    target = open_target(graph, path, fmt, {"backing": source.name} if sync == "none" else {})
    return source, target, sync


def drive_backup_request(devices: Devices, graph: BlockGraph, args: dict[str, Any]) -> BackupRequest:
    """drive-backup's target made and opened, then its BackupCommon checked (under the
    graph lock; the target closes again on a failure)."""
    source, target, sync = drive_backup_target(devices, graph, args)
    try:
        return backup_common(args, source, target, sync)
    except BaseException:
        graph.release(target)
        raise


async def start_drive_backup(block: BlockService, devices: Devices, blockjobs: BlockJobs,
                             args: dict[str, Any]) -> None:
    """qmp_drive_backup: the target made and opened, then the job started; a job that
    cannot start lets its target go again."""
    request = await block.run(drive_backup_request, devices, block.graph, args)
    try:
        await blockjobs.backup(request)
    except QMPError:
        await block.run(block.graph.release, request.target)
        raise
