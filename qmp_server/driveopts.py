"""``-drive``'s QemuOpts syntax and what its legacy options mean for blockdev options.

``-drive`` is not keyval: it is QemuOpts, flat (``file=x,file.locking=off`` names the
filename and an option of the file node side by side, which keyval refuses as
inconsistent), with legacy spellings (``readonly``, ``cache=none``, ``aio=``,
``format=``) that QEMU's drive_new/blockdev_init turn into block options.
"""

from __future__ import annotations

from typing import Any

from .errors import QMPError

#: bdrv_parse_cache_mode: cache=MODE as (writeback, direct, no-flush).
CACHE_MODES: dict[str, tuple[bool, bool, bool]] = {
    "writeback": (True, False, False),
    "writethrough": (False, False, False),
    "none": (True, True, False),
    "off": (True, True, False),
    "directsync": (False, True, False),
    "unsafe": (True, False, True),
}


def parse_qemu_opts(text: str, warnings: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """QemuOpts' opts_do_parse: ``name=value`` pairs split at ``,`` (``,,`` is a comma);
    a bare ``name`` means ``name=on``, ``noname`` ``name=off``, each with QEMU's
    deprecation warning and hint appended to ``warnings`` (get_opt_name_value). The last
    value of a name counts."""
    options: dict[str, str] = {}
    position = 0
    while position < len(text):
        chars: list[str] = []
        while position < len(text):
            char = text[position]
            if char == ",":
                if text[position + 1:position + 2] == ",":
                    chars.append(",")
                    position += 2
                    continue
                break
            chars.append(char)
            position += 1
        position += 1  # the separating comma
        item = "".join(chars)
        name, sep, value = item.partition("=")
        if not name:
            raise QMPError("Invalid parameter ''")
        if not sep:
            flag = name
            value = "on"
            if name.startswith("no"):
                name, value = name[2:], "off"
            if warnings is not None and (value == "off" or name not in ("help", "?")):
                hint = (f"Please use nodelay={'on' if value == 'off' else 'off'} instead" if name == "delay"
                        else f"Please use {name}={value} instead")
                warnings.append((f"short-form boolean option '{flag}' deprecated", hint))
        options[name] = value
    return options


def nest(options: dict[str, str]) -> dict[str, Any]:
    """Dotted names as nested dicts (``file.locking`` -> ``{"file": {"locking": ...}}``)."""
    tree: dict[str, Any] = {}
    for name, value in options.items():
        *parents, last = name.split(".")
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise QMPError(f"Parameters '{part}.*' used inconsistently")
            node = child
        if isinstance(node.get(last), dict):
            raise QMPError(f"Parameters '{name}.*' used inconsistently")
        node[last] = value
    return tree
