"""Run-state semantics of stop/cont (QEMU 10.x), checked through the VM object."""

from __future__ import annotations

from typing import Any

import pytest

from qmp_server.errors import QMPError
from qmp_server.events import EventBus
from qmp_server.runstate import TRANSITIONS, VM, InvalidTransition, RunState


class Hooks:
    def __init__(self, fail_activate: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_activate = fail_activate

    async def drain_and_flush_all(self) -> None:
        self.calls.append("flush")

    async def activate_all(self) -> None:
        self.calls.append("activate")
        if self.fail_activate:
            raise QMPError(self.fail_activate)


def make_vm(**kwargs: Any) -> tuple[VM, list[str], Hooks]:
    bus = EventBus()
    events: list[str] = []
    bus.subscribe(lambda m: events.append(m["event"]))
    vm = VM(bus, **kwargs)
    hooks = Hooks()
    vm.block = hooks
    vm.start_after_launch()
    return vm, events, hooks


async def test_stop_cont_events_only_on_change() -> None:
    vm, events, hooks = make_vm()
    assert events == ["RESUME"] and vm.state is RunState.RUNNING
    await vm.stop()
    await vm.stop()
    assert events == ["RESUME", "STOP"]
    assert hooks.calls == ["flush", "flush"]  # stop always flushes, even when already paused
    await vm.cont()
    await vm.cont()
    assert events == ["RESUME", "STOP", "RESUME"]
    assert hooks.calls == ["flush", "flush", "activate", "activate"]


async def test_prelaunch_with_S() -> None:
    vm, events, _ = make_vm(start_paused=True)
    assert vm.state is RunState.PRELAUNCH and events == []
    await vm.stop()
    assert vm.state is RunState.PRELAUNCH and events == []
    await vm.cont()
    assert vm.state is RunState.RUNNING and events == ["RESUME"]


async def test_inmigrate_stop_and_cont_only_touch_autostart() -> None:
    vm, events, hooks = make_vm(incoming=True)
    assert vm.state is RunState.INMIGRATE and vm.autostart
    await vm.stop()
    assert not vm.autostart and vm.state is RunState.INMIGRATE
    await vm.cont()
    assert vm.autostart and vm.state is RunState.INMIGRATE
    assert events == [] and hooks.calls == []


async def test_cont_refusals() -> None:
    vm, _, _ = make_vm()
    vm.set_state(RunState.FINISH_MIGRATE)
    with pytest.raises(QMPError, match="Migration is not finalized yet"):
        await vm.cont()
    vm.set_state(RunState.SHUTDOWN)
    with pytest.raises(QMPError, match="Resetting the Virtual Machine is required"):
        await vm.cont()


async def test_failed_activation_keeps_state() -> None:
    vm, events, hooks = make_vm()
    await vm.vm_stop(RunState.FINISH_MIGRATE)
    vm.set_state(RunState.POSTMIGRATE)
    hooks.fail_activate = 'Failed to get "write" lock'
    with pytest.raises(QMPError, match='Failed to get "write" lock'):
        await vm.cont()
    assert vm.state is RunState.POSTMIGRATE and events == ["RESUME", "STOP"]


def test_illegal_transition_is_a_bug() -> None:
    vm, _, _ = make_vm()
    vm.set_state(RunState.PAUSED)
    with pytest.raises(InvalidTransition):
        vm.set_state(RunState.INMIGRATE)
    assert (RunState.POSTMIGRATE, RunState.PAUSED) not in TRANSITIONS
