"""The emulated machine: run state, block devices, migration, events, and exit."""

from __future__ import annotations

from dataclasses import dataclass, field

from .blockjobs import BlockJobs
from .blockservice import BlockService
from .devices import Devices
from .events import EventBus
from .fdsets import fdsets_of
from .hmp.monitor import HumanMonitor
from .jobs import JobService
from .migration.service import MigrationService
from .nbd.service import NbdService
from .objects import Objects
from .runstate import VM
from .schema import Schema
from .vmsnapshots import InternalSnapshots


@dataclass
class MachineConfig:
    """What the command line decided about the machine."""

    name: str | None = None
    start_paused: bool = False
    incoming: str | None = None
    #: ``-machine type=``: a name or alias from machinemodel.MACHINE_TYPES. Without a
    #: guest the server is QEMU's ``-machine none``, hence the default.
    machine_type: str = "none"
    #: ``-uuid``; QEMU reports all zeros when none was given.
    uuid: str = "00000000-0000-0000-0000-000000000000"
    #: ``-no-shutdown``: a guest power-off stops the VM (run state ``shutdown``) instead
    #: of ending the process.
    no_shutdown: bool = False
    #: ``-no-reboot``: a reset request shuts the VM down instead.
    no_reboot: bool = False
    #: ``-smp`` as typed: the vCPUs query-cpus-fast lists (machinemodel.cpu_topology).
    smp: str | None = None
    #: The character devices (-chardev, and one per -qmp/-monitor), in command-line order:
    #: (label, query-chardev filename while connected, QOM type).
    chardevs: list[tuple[str, str, str]] = field(default_factory=list)


class Machine:
    """Everything the commands act on; one per server process."""

    def __init__(self, config: MachineConfig, schema: Schema | None = None) -> None:
        self.config = config
        self.name = config.name
        self.schema = schema if schema is not None else Schema.load()
        self.events = EventBus()
        # The wiring: each service gets the narrow parts it needs, lower layers first.
        self.vm = VM(self.events, start_paused=config.start_paused,
                     incoming=config.incoming is not None, no_shutdown=config.no_shutdown,
                     no_reboot=config.no_reboot)
        # The fd sets (add-fd) open /dev/fdset/N file names for the block layer.
        fdsets = fdsets_of(self)
        fdsets.running = lambda: self.vm.running
        self.block = BlockService(self.vm, opener=fdsets)
        self.vm.block = self.block
        schema = self.schema
        self.devices = Devices(self.vm, self.block, config.machine_type,
                               lambda tree: schema.keyval_arguments("blockdev-add", tree))
        self.block.device_name = self.devices.device_name
        self.block.graph.backend_names = lambda: self.devices.named
        #: Jobs (blockdev-create, ...): they only announce their states as events.
        self.jobs = JobService(self.events)
        #: Block jobs (block-stream, block-commit), jobs on the block graph.
        self.blockjobs = BlockJobs(self.jobs, self.block, self.events)
        #: -object / object-add objects (/objects in QOM).
        self.objects = Objects()
        self.vm.state_listeners.append(self.devices.vm_state_changed)
        self.devices.auto_del_listeners.append(self.blockjobs.cancel_jobs_on)
        self.migration = MigrationService(self.vm, self.block, config.incoming)
        # Named BlockBackends, by which the dirty-bitmaps capability addresses bitmaps.
        self.migration.backends = lambda: [(blk.name, blk.node)
                                           for blk, _ in self.devices.backends() if blk.name]
        #: Internal snapshots (savevm/loadvm/delvm, snapshot-* jobs, -loadvm).
        self.internal_snapshots = InternalSnapshots(self.vm, self.block, self.devices.backends,
                                                    config.machine_type)
        #: The NBD server and its block exports.
        self.nbd = NbdService(self.block, self.events)
        # A savevm (HMP's or snapshot-save's) is a migration into the image, which
        # query-migrate shows (qemu_savevm_state).
        self.internal_snapshots.migration = self.migration
        self.hmp = HumanMonitor(self.vm, self.block, self.devices, self.migration, config.name,
                                self.internal_snapshots, self.nbd, self.blockjobs)
