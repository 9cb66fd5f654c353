"""The human monitor (HMP) behind ``human-monitor-command``.

Output lines end in CRLF, as QEMU's monitor writes them. As in QEMU, ``qemu-io`` prints its
results on the process's stdout and its usage errors on stderr (:mod:`..console`); the
monitor gets only what QEMU reports there (permission errors, warnings).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from blocklayer.commit import commit_to_backing

from .. import blockresize, blockstats
from ..backuprequest import start_drive_backup
from ..blockjobs import BlockJobs
from ..blockservice import BlockService
from ..console import STDERR, STDOUT, ProcessConsole
from ..devices import Devices
from ..errors import QMPError, with_hints
from ..fdsets import NO_FD, MonitorFds
from ..keyval import parse_keyval
from ..migration.service import MigrationService
from ..nbd.service import NbdService
from ..runstate import VM
from ..version import PACKAGE, version_string
from ..vmsnapshots import InternalSnapshots
from .args import HmpArgumentError, hmp_string, parse_arguments, skip_space
from .blocktext import info_block_text
from .migration import MigrationCommands
from .nbd import HELP as NBD_HELP
from .nbd import NbdCommands
from .sizes import INT64_MAX, qemu_strtosz_mib
from .snapshots import HELP as SNAPSHOT_HELP
from .snapshots import INFO_HELP as SNAPSHOT_INFO_HELP
from .snapshots import SnapshotCommands

HmpHandler = Callable[[str], Awaitable[str]]

#: The descriptors of the HMP monitor running the command now: its character device's
#: (a UNIX socket), or None under ``human-monitor-command``, whose temporary monitor
#: has no character device and no names (QEMU's monitor_cur() in qmp_getfd/closefd).
_MONITOR_FDS: ContextVar[MonitorFds | None] = ContextVar("hmp_monitor_fds", default=None)


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def _warnings_text(warnings: list[tuple[str, str]]) -> str:
    # warn_report and error_printf with the monitor current: its output, no program name.
    return "".join(f"warning: {message}\n{hint}\n" for message, hint in warnings)


#: The info subcommands without arguments (their args_type is empty in QEMU).
_DRIVE_BACKUP_ARGS = "reuse:-n,full:-f,compress:-c,device:B,target:s,format:s?"
_DRIVE_BACKUP_HELP = (
    "drive_backup [-n] [-f] [-c] device target [format] -- initiates a point-in-time\n"
    "\t\t\tcopy for a device. The device's contents are\n"
    "\t\t\tcopied to the new image file, excluding data that\n"
    "\t\t\tis written after the command is started.\n"
    "\t\t\tThe -n flag requests QEMU to reuse the image found\n"
    "\t\t\tin new-image-file, instead of recreating it from scratch.\n"
    "\t\t\tThe -f flag requests QEMU to copy the whole disk,\n"
    "\t\t\tso that the result does not need a backing file.\n"
    "\t\t\tThe -c flag requests QEMU to compress backup data\n"
    "\t\t\t(if the target format supports it).\n\t\t\t")

_INFO_WITHOUT_ARGUMENTS = frozenset({"status", "name", "version", "blockstats", "block-jobs",
                                     "cpus", "iothreads", "migrate_capabilities",
                                     "migrate_parameters"})


class HumanMonitor:
    """Dispatches HMP command lines."""

    def __init__(self, vm: VM, block: BlockService, devices: Devices, migration: MigrationService,
                 name: str | None, snapshots: InternalSnapshots | None = None,
                 nbd: NbdService | None = None, blockjobs: BlockJobs | None = None) -> None:
        self.vm = vm
        #: The block jobs (drive_backup starts one).
        self.blockjobs = blockjobs
        self.block = block
        self.devices = devices
        self.name = name
        #: The process's stdout and stderr, where qemu-io prints (app.py tells it which
        #: monitors share them).
        self.console = ProcessConsole()
        #: QMP's plain queries bound to the machine (app.py wires them in), for the info
        #: commands QEMU builds on them (``info cpus``, ``info iothreads``).
        self.queries: dict[str, Callable[[], Any]] = {}
        mig = MigrationCommands(migration)
        self.commands: dict[str, tuple[HmpHandler, str]] = {
            "help": (self._help, "help|? [cmd] -- show the help"),
            "?": (self._help, ""),
            "info": (self._info,
                     "info [subcommand] -- show various information about the system state"),
            "qemu-io": (self._qemu_io,
                        'qemu-io [-d] [device] "[command]" -- run a qemu-io command on a block device'),
            "cont": (self._cont, "cont|c  -- resume emulation"),
            "c": (self._cont, ""),
            "stop": (self._stop, "stop|s  -- stop emulation"),
            "s": (self._stop, ""),
            "quit": (self._quit, "quit|q  -- quit the emulator"),
            "q": (self._quit, ""),
            "drive_add": (self._drive_add, "drive_add [-n] [[<domain>:]<bus>:]<slot>\n"
                                           "[file=file][,if=type][,bus=n]\n"
                                           "[,unit=m][,media=d][,index=i]\n"
                                           "[,snapshot=on|off][,cache=on|off]\n"
                                           "[,readonly=on|off][,copy-on-read=on|off] -- add drive "
                                           "to PCI storage controller"),
            "drive_del": (self._drive_del, "drive_del device -- remove host block device"),
            "commit": (self._commit, "commit device|all -- commit changes to the disk images (if "
                                     "-snapshot is used) or backing files"),
            "drive_backup": (self._drive_backup, _DRIVE_BACKUP_HELP),
            "block_resize": (self._block_resize,
                             "block_resize device size -- resize a block image"),
            "migrate": (mig.migrate, "migrate [-d] uri -- migrate to URI (using -d to not wait "
                                     "for completion)"),
            "migrate_cancel": (mig.migrate_cancel, "migrate_cancel  -- cancel the current VM "
                                                   "migration"),
            "migrate_start_postcopy": (mig.migrate_start_postcopy,
                                       "migrate_start_postcopy  -- Followup to a migration command to "
                                       "switch the migration to postcopy mode. The postcopy-ram "
                                       "capability must be set on both source and destination before "
                                       "the original migration command ."),
            "migrate_incoming": (mig.migrate_incoming, "migrate_incoming uri -- Continue an incoming "
                                                       "migration from an -incoming defer"),
            "migrate_set_capability": (mig.set_capability, "migrate_set_capability capability state "
                                                           "-- Enable/Disable the usage of a capability "
                                                           "for migration"),
            "migrate_set_parameter": (mig.set_parameter, "migrate_set_parameter parameter value -- "
                                                         "Set the parameter for migration"),
            "getfd": (self._getfd, "getfd getfd name -- receive a file descriptor via SCM rights "
                                   "and assign it a name"),
            "closefd": (self._closefd, "closefd closefd name -- close a file descriptor previously "
                                       "passed via SCM rights"),
        }
        snap = SnapshotCommands(vm, snapshots) if snapshots is not None else None
        if snap is not None:
            self.commands.update({"savevm": (snap.savevm, SNAPSHOT_HELP["savevm"]),
                                  "loadvm": (snap.loadvm, SNAPSHOT_HELP["loadvm"]),
                                  "delvm": (snap.delvm, SNAPSHOT_HELP["delvm"])})
        if nbd is not None:
            nbd_cmds = NbdCommands(nbd, devices, _MONITOR_FDS.get)
            self.commands.update({"nbd_server_start": (nbd_cmds.start, NBD_HELP["nbd_server_start"]),
                                  "nbd_server_add": (nbd_cmds.add, NBD_HELP["nbd_server_add"]),
                                  "nbd_server_remove": (nbd_cmds.remove, NBD_HELP["nbd_server_remove"]),
                                  "nbd_server_stop": (nbd_cmds.stop, NBD_HELP["nbd_server_stop"])})
        self.info_commands: dict[str, tuple[Callable[[list[str]], Awaitable[str]], str]] = {
            "status": (self._info_status, "info status  -- show the current VM status (running|paused)"),
            "name": (self._info_name, "info name  -- show the current VM name"),
            "version": (self._info_version, "info version  -- show the version of QEMU"),
            "block": (self._info_block,
                      "info block [-n] [-v] [device] -- show info of one block device or all "
                      "block devices (-n: show named nodes; -v: show details)"),
            "blockstats": (self._info_blockstats, "info blockstats  -- show block device statistics"),
            "block-jobs": (self._info_block_jobs, "info block-jobs  -- show progress of ongoing block "
                                                  "device operations"),
            "cpus": (self._info_cpus, "info cpus  -- show infos for each CPU"),
            "iothreads": (self._info_iothreads, "info iothreads  -- show iothreads"),
            "migrate": (mig.info_migrate, "info migrate [-a] -- show migration status (-a: all "
                                          "details)"),
            "migrate_capabilities": (mig.info_capabilities, "info migrate_capabilities  -- show "
                                                            "current migration capabilities"),
            "migrate_parameters": (mig.info_parameters, "info migrate_parameters  -- show "
                                                        "current migration parameters"),
        }
        if snap is not None:
            self.info_commands["snapshots"] = (snap.info_snapshots, SNAPSHOT_INFO_HELP)

    async def execute(self, line: str, fds: MonitorFds | None = None) -> str:
        """Run one command line; returns the text the monitor printed (CRLF line ends).

        ``fds``: the descriptors of the monitor's character device (None for
        ``human-monitor-command``), which ``getfd``/``closefd`` act on.
        """
        token = _MONITOR_FDS.set(fds)
        try:
            return await self._execute(line)
        finally:
            _MONITOR_FDS.reset(token)

    async def _execute(self, line: str) -> str:
        stripped = line.strip()
        if not stripped:
            return ""
        name, _, rest = stripped.partition(" ")
        entry = self.commands.get(name)
        if entry is None:
            return f"unknown command: '{name}'\r\n"
        return _crlf(await entry[0](rest.strip()))

    async def _getfd(self, args: str) -> str:
        # hmp_getfd -> qmp_getfd on this monitor: the descriptor its chardev received.
        try:
            name = str(parse_arguments("getfd", "fdname:s", args)["fdname"])
        except HmpArgumentError as err:
            return err.monitor_text
        fds = _MONITOR_FDS.get()
        try:
            if fds is None:
                raise QMPError(NO_FD)
            fds.getfd(name)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def _closefd(self, args: str) -> str:
        # hmp_closefd -> qmp_closefd: only this monitor's names.
        try:
            name = str(parse_arguments("closefd", "fdname:s", args)["fdname"])
        except HmpArgumentError as err:
            return err.monitor_text
        fds = _MONITOR_FDS.get()
        try:
            if fds is None:
                raise QMPError(f"File descriptor named '{name}' not found")
            fds.closefd(name)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def _cont(self, args: str) -> str:
        # hmp_cont: the QMP command, its error printed as hmp_handle_error does.
        try:
            await self.vm.cont()
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def _stop(self, args: str) -> str:
        await self.vm.stop()
        return ""

    async def _quit(self, args: str) -> str:
        # hmp_quit: as QMP quit (monitor_suspend, then qmp_quit's SHUTDOWN and exit).
        if await self.vm.shutdown("host-qmp-quit"):
            self.vm.request_exit(0)
        return ""

    async def _help(self, args: str) -> str:
        # help_cmd -> help_cmd_dump: without an argument every command; else only the one
        # named (an alias finds its command: "help c" is "cont|c"), "info" alone lists
        # the info subcommands, "info NAME" one of them. Words past a command are ignored.
        words = args.split()
        if not words:
            return "".join(text + "\n" for _, text in self.commands.values() if text)
        if words[0] == "info":
            if len(words) == 1:
                return "".join(help_text + "\n" for _, help_text in self.info_commands.values())
            info = self.info_commands.get(words[1])
            if info is None:
                return _unknown_command(words, 1)
            return info[1] + "\n"
        entry = self.commands.get(words[0])
        if entry is None:
            return _unknown_command(words, 0)
        handler, text = entry
        if not text:  # an alias: the help line is its command's
            text = next(line for function, line in self.commands.values()
                        if function == handler and line)
        return text + "\n"

    async def _info(self, args: str) -> str:
        if not args:
            return await self._help("info")
        words = args.split()
        entry = self.info_commands.get(words[0])
        if entry is None:
            return f"unknown command: 'info {words[0]}'\n"
        if len(words) > 1 and (words[0] in _INFO_WITHOUT_ARGUMENTS
                               or (words[0] == "migrate" and words[1:] != ["-a"])):
            # monitor_parse_arguments: an info command whose args_type is empty (``info
            # migrate``: only 10.1's -a) refuses anything after its name (QEMU 7.2 live).
            return HmpArgumentError(f"{words[0]}: extraneous characters at the end of line",
                                    f"info {words[0]}").monitor_text
        return await entry[0](words[1:])

    async def _info_status(self, args: list[str]) -> str:
        vm = self.vm
        text = "VM status: " + ("running" if vm.running else "paused")
        if not vm.running and vm.state.value != "paused":
            text += f" ({vm.state.value})"
        return text + "\n"

    async def _info_name(self, args: list[str]) -> str:
        name = self.name
        return "" if name is None else f"{name}\n"

    async def _info_version(self, args: list[str]) -> str:
        return f"{version_string()} ({PACKAGE})\n"

    async def _info_block(self, args: list[str]) -> str:
        # hmp_info_block: "info block [-n] [-v] [device]".
        wanted = [a for a in args if not a.startswith("-")]
        device = wanted[0] if wanted else None
        nodes_only = "-n" in args
        backends = [] if nodes_only else await self.block.run_light(self.devices.query_block)
        nodes = None
        if device is not None or nodes_only:
            try:
                # qmp_query_named_block_nodes without flat: images with their backing.
                nodes = await self.block.query_named_block_nodes(False)
            except QMPError:
                nodes = []  # hmp_info_block ignores the error (an ejected node): no lines
        return info_block_text(backends, nodes, device, nodes_only=nodes_only, verbose="-v" in args)

    async def _info_blockstats(self, args: list[str]) -> str:
        # hmp_info_blockstats: query-blockstats' backends, one line each.
        devices = self.devices
        stats = await self.block.run_light(lambda: blockstats.query_blockstats(
            self.block.graph, [blk for blk, _ in devices.backends()], False))
        return blockstats.hmp_info_blockstats(stats)

    async def _info_block_jobs(self, args: list[str]) -> str:
        # hmp_info_block_jobs: query-block-jobs, a stream job worded apart from the others.
        jobs = self.queries.get("query-block-jobs", list)()
        if not jobs:
            return "No active jobs\n"
        text = ""
        for job in jobs:
            what = ("Streaming device" if job["type"] == "stream"
                    else f"Type {job['type']}, device")
            text += (f"{what} {job['device']}: Completed {job['offset']} of {job['len']} bytes, "
                     f"speed limit {job['speed']} bytes/s\n")
        return text

    async def _info_cpus(self, args: list[str]) -> str:
        # hmp_info_cpus: query-cpus-fast; '*' marks the monitor's current CPU, the first
        # one until ``cpu N`` (not modelled) picks another.
        cpus = self.queries.get("query-cpus-fast", list)()
        return "".join(f"{'*' if position == 0 else ' '} CPU #{cpu['cpu-index']}: "
                       f"thread_id={cpu['thread-id']}\n" for position, cpu in enumerate(cpus))

    async def _info_iothreads(self, args: list[str]) -> str:
        # hmp_info_iothreads: query-iothreads, each with its thread and polling settings.
        text = ""
        for info in self.queries.get("query-iothreads", list)():
            text += (f"{info['id']}:\n  thread_id={info['thread-id']}\n"
                     f"  poll-max-ns={info['poll-max-ns']}\n  poll-grow={info['poll-grow']}\n"
                     f"  poll-shrink={info['poll-shrink']}\n  aio-max-batch={info['aio-max-batch']}\n")
        return text

    async def _drive_add(self, args: str) -> str:
        # hmp_drive_add: errors printed as error_report_err does (no "Error: " prefix).
        try:
            parsed = parse_arguments("drive_add", "node:-n,pci_addr:s,opts:s", args)
        except HmpArgumentError as err:
            return err.monitor_text
        opts = str(parsed["opts"])
        warnings: list[tuple[str, str]] = []
        try:
            if parsed["node"]:
                # hmp_drive_add_node: a blockdev-add from keyval options.
                options = parse_keyval(opts)
                if "node-name" not in options:
                    raise QMPError("'node-name' needs to be specified")
                await self.block.blockdev_add(options)
            else:
                await self.block.run_light(self.devices.drive_add, opts, warnings)
        except QMPError as err:
            return _warnings_text(warnings) + f"{with_hints(err)}\n"
        return _warnings_text(warnings) + "OK\n"

    async def _drive_del(self, args: str) -> str:
        try:
            parsed = parse_arguments("drive_del", "id:B", args)
        except HmpArgumentError as err:
            return err.monitor_text
        try:
            await self.block.run_light(self.devices.drive_del, str(parsed["id"]))
        except QMPError as err:
            return f"{err.desc}\n"
        return ""

    async def _drive_backup(self, args: str) -> str:
        # hmp_drive_backup: "reuse:-n,full:-f,compress:-c,device:B,target:s,format:s?",
        # then qmp_drive_backup; errors as hmp_handle_error.
        try:
            parsed = parse_arguments("drive_backup", _DRIVE_BACKUP_ARGS, args)
        except HmpArgumentError as err:
            return err.monitor_text
        if self.blockjobs is None:
            return "Error: block jobs are not available\n"
        backup: dict[str, Any] = {
            "device": parsed["device"], "target": parsed["target"],
            "sync": "full" if parsed.get("full") else "top",
            "mode": "existing" if parsed.get("reuse") else "absolute-paths"}
        if "format" in parsed:
            backup["format"] = parsed["format"]
        if parsed.get("compress"):
            backup["compress"] = True
        try:
            await start_drive_backup(self.block, self.devices, self.blockjobs, backup)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def _commit(self, args: str) -> str:
        # hmp_commit: "device:B"; the copy is I/O, done in a worker thread.
        try:
            parsed = parse_arguments("commit", "device:B", args)
        except HmpArgumentError as err:
            return err.monitor_text
        device = str(parsed["device"])
        try:
            nodes = await self.block.run_light(self.devices.commit_nodes, device)
        except QMPError as err:
            return f"{err.desc}\n"
        try:
            for node in nodes:
                await self.block.run(commit_to_backing, self.block.graph, node)
        except QMPError as err:
            return f"'commit' error for '{device}': {err.desc}\n"
        return ""

    async def _block_resize(self, args: str) -> str:
        # hmp_block_resize: "device:B,size:o" (the size in MiB unless it has a suffix),
        # then qmp_block_resize on the backend of that name; errors as hmp_handle_error.
        invalid = 'invalid size\nTry "help block_resize" for more information\n'
        pos = skip_space(args, 0)
        stdout: list[str] = []
        word = hmp_string(args, pos, stdout)
        if word is None:
            return HmpArgumentError("block_resize: block device name expected", "block_resize",
                                    "".join(stdout)).monitor_text
        device, pos = word
        pos = skip_space(args, pos)
        parsed = qemu_strtosz_mib(args[pos:])
        if parsed is None or parsed[0] > INT64_MAX:
            return invalid
        size, used = parsed
        if skip_space(args, pos + used) < len(args):
            return HmpArgumentError("block_resize: extraneous characters at the end of line",
                                    "block_resize").monitor_text
        try:
            await blockresize.block_resize(self.block, self.devices, device, None, size)
        except QMPError as err:
            return f"Error: {err.desc}\n"
        return ""

    async def _qemu_io(self, args: str) -> str:
        # hmp_qemu_io: on a device's backend (-d), else on a named backend (-drive id=),
        # both with their own permissions, which qemu-io extends as a command needs; else
        # on a node, through a temporary BlockBackend that asks for nothing until a
        # command needs to write.
        # qemu-io is imported on first use: most servers never run it (start-up time).
        from .nodetarget import BackendTarget, NodeTarget
        from .qemu_io import Channel, HmpArgumentError, QemuIoOutput, execute_qemu_io, split_hmp_qemu_io_args

        try:
            qdev, device, command = split_hmp_qemu_io_args(args)
        except HmpArgumentError as err:
            return err.monitor_text
        backend = None
        if qdev:
            # blk_by_qdev_id: the device that holds the backend. For virtio-blk-pci that is
            # its virtio-backend child, named by QOM path; the proxy itself has none.
            found = self.devices.resolve(device)
            if found is None:
                return f"Error: Device '{device}' not found\n"
            frontend, matched = found
            if frontend.backend is None or matched != frontend.qdev:
                return "Error: Device does not have a block device backend\n"
            backend = frontend.backend
        else:
            backend = self.devices.named.get(device)
        output: QemuIoOutput | None
        if backend is not None:
            chosen = backend
            try:
                output = await self.block.run(lambda: execute_qemu_io(BackendTarget(chosen), command))
            except QMPError as err:
                return f"Error: {err.desc}\n"
        else:
            output = await self.block.lend_node(
                device, "block device 'qemu-io'",
                lambda graph, edge: execute_qemu_io(NodeTarget(graph, edge), command))
            if output is None:
                return f"Error: Cannot find device='' nor node-name='{device}'\n"
        # qemuio_command: printf() and fprintf(stderr) reach the process's stdout and
        # stderr; only error_report() (the monitor is current) reaches the monitor.
        await self.console.print([(STDERR if where is Channel.STDERR else STDOUT, text)
                                  for where, text in output.chunks if where is not Channel.MONITOR])
        return output.monitor


def _unknown_command(words: list[str], index: int) -> str:
    """help_cmd_dump's "Command not found": the words up to the unknown one, quoted."""
    return "unknown command: '" + " ".join(words[:index + 1]) + "'\n"


__all__ = ["HumanMonitor"]
