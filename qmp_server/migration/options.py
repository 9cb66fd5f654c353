"""Migration capabilities and parameters: QEMU's names, defaults and checks.

Only the ``events`` capability changes what this server does. Every other capability and
parameter is accepted, checked the way QEMU checks it and reported back, but ignored:
there is no guest RAM to compress, throttle or copy in several channels, and block
activation is always late (QEMU 10.x ignores ``late-block-activate`` too).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import QMPError
from .bitmaps import check_mapping

#: QEMU 10.x's MigrationCapability enum, in its order. This table and PARAMETER_DEFAULTS are
#: checked against the schema at start-up (:mod:`qmp_server.schema_facts`).
CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
    "mapped-ram",
)

#: QEMU 10.x's defaults (migration/options.c), in query-migrate-parameters order.
PARAMETER_DEFAULTS: dict[str, Any] = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "max-bandwidth": 134217728,
    "avail-switchover-bandwidth": 0,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "multifd-channels": 2,
    "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-qatzip-level": 1,
    "multifd-zstd-level": 1,
    "x-vcpu-dirty-limit-period": 1000,
    "vcpu-dirty-limit": 1,
    "mode": "normal",
    "zero-page-detection": "multifd",
    "direct-io": False,
}

MIGRATION_ACTIVE = "There's a migration process in progress"
TARGET_PAGE_SIZE = 4096


def _expects(name: str, what: str) -> QMPError:
    # QEMU's QERR_INVALID_PARAMETER_VALUE, with the C field name as QEMU prints it.
    return QMPError(f"Parameter '{name}' expects {what}")


def check_capabilities(caps: Mapping[str, bool]) -> None:
    """QEMU's checks between capabilities (``migrate_caps_check``) that apply to any host."""
    on = {name for name, state in caps.items() if state}
    if "postcopy-ram" in on and "x-ignore-shared" in on:
        raise QMPError("Postcopy is not compatible with ignore-shared")
    if "zero-copy-send" in on and ("multifd" not in on or "xbzrle" in on):
        raise QMPError("Zero copy only available for non-compressed non-TLS multifd migration")
    if "postcopy-preempt" in on and "postcopy-ram" not in on:
        raise QMPError("Postcopy preempt requires postcopy-ram")
    if "switchover-ack" in on and "return-path" not in on:
        raise QMPError("Capability 'switchover-ack' requires capability 'return-path'")
    if "dirty-limit" in on:
        if "auto-converge" in on:
            raise QMPError("dirty-limit conflicts with auto-converge either of then available currently")
        # There is no KVM here, let alone a dirty ring.
        raise QMPError("dirty-limit requires KVM with accelerator property 'dirty-ring-size' set")
    if "multifd" in on and "xbzrle" in on:
        raise QMPError("Multifd is not compatible with xbzrle")


def check_parameters(params: Mapping[str, Any]) -> None:
    """QEMU's range checks (``migrate_params_check``) on the merged parameter set."""
    def between(key: str, low: int, high: int) -> bool:
        return low <= int(params[key]) <= high

    if not between("throttle-trigger-threshold", 1, 100):
        raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not between("cpu-throttle-initial", 1, 99):
        raise _expects("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not between("cpu-throttle-increment", 1, 99):
        raise _expects("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if params["downtime-limit"] > 2000 * 1000:
        raise _expects("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    if not between("multifd-channels", 1, 255):
        raise _expects("multifd_channels", "a value between 1 and 255")
    if params["multifd-zlib-level"] > 9:
        raise _expects("multifd_zlib_level", "a value between 0 and 9")
    if not between("multifd-qatzip-level", 1, 9):
        raise _expects("multifd_qatzip_level", "a value between 1 and 9")
    if params["multifd-zstd-level"] > 20:
        raise _expects("multifd_zstd_level", "a value between 0 and 20")
    size = params["xbzrle-cache-size"]
    if size < TARGET_PAGE_SIZE or size & (size - 1):
        raise _expects("xbzrle_cache_size", "a power of two no less than the target page size")
    if not params["cpu-throttle-initial"] <= params["max-cpu-throttle"] <= 99:
        raise _expects("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if params["announce-initial"] > 100000:
        raise _expects("announce_initial", "a value between 0 and 100000")
    if params["announce-max"] > 100000:
        raise _expects("announce_max", "a value between 0 and 100000")
    if params["announce-rounds"] > 1000:
        raise _expects("announce_rounds", "a value between 0 and 1000")
    if not between("announce-step", 1, 10000):
        raise _expects("announce_step", "a value between 0 and 10000")
    mapping = params.get("block-bitmap-mapping")
    if isinstance(mapping, list):
        problem = check_mapping(mapping)
        if problem is not None:
            raise QMPError(f"Invalid mapping given for block-bitmap-mapping: {problem}")
    if not between("x-vcpu-dirty-limit-period", 1, 1000):
        raise _expects("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if params["vcpu-dirty-limit"] < 1:
        raise _expects("vcpu_dirty_limit", "is invalid, it must greater then 1 MB/s")


class MigrationOptions:
    """The capabilities and parameters of one machine."""

    def __init__(self, capability_names: Iterable[str] = CAPABILITIES,
                 parameter_names: Iterable[str] | None = None) -> None:
        self.capabilities: dict[str, bool] = {name: False for name in capability_names}
        names = list(parameter_names) if parameter_names is not None else list(PARAMETER_DEFAULTS)
        self.parameters: dict[str, Any] = {
            name: PARAMETER_DEFAULTS[name] for name in names if name in PARAMETER_DEFAULTS
        }

    @property
    def events(self) -> bool:
        """Whether MIGRATION events are sent."""
        return self.capabilities.get("events", False)

    @property
    def dirty_bitmaps(self) -> bool:
        """Whether named dirty bitmaps travel in the stream (``dirty-bitmaps``)."""
        return self.capabilities.get("dirty-bitmaps", False)

    @property
    def bitmap_mapping(self) -> list[dict[str, Any]] | None:
        """``block-bitmap-mapping`` if set (None: match by backend and node names)."""
        value = self.parameters.get("block-bitmap-mapping")
        return copy.deepcopy(value) if isinstance(value, list) else None

    def set_capabilities(self, changes: list[dict[str, Any]]) -> None:
        """``migrate-set-capabilities``: all or nothing, like QEMU."""
        new = dict(self.capabilities)
        for item in changes:
            new[item["capability"]] = bool(item["state"])
        check_capabilities(new)
        self.capabilities = new

    def query_capabilities(self) -> list[dict[str, Any]]:
        """``query-migrate-capabilities``."""
        return [{"state": state, "capability": name} for name, state in self.capabilities.items()]

    def set_parameters(self, changes: Mapping[str, Any]) -> None:
        """``migrate-set-parameters``: check the merged set, then apply all or nothing."""
        merged = dict(self.parameters)
        for key, value in changes.items():
            if key in ("tls-creds", "tls-hostname", "tls-authz") and value is None:
                # StrOrNull: null resets to "no TLS", reported as "".
                value = ""
            merged[key] = copy.deepcopy(value)
        full = {**PARAMETER_DEFAULTS, **merged}
        check_parameters(full)
        self.parameters = merged

    def query_parameters(self) -> dict[str, Any]:
        """``query-migrate-parameters``."""
        return copy.deepcopy(self.parameters)
