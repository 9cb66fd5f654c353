"""Encoding server output exactly as QEMU's monitor does.

QEMU writes one compact JSON object per line, ``", "``/``": "`` separators, every code
point outside printable ASCII escaped as ``\\uXXXX`` with upper-case hex (surrogate pairs
above the BMP), and CRLF line ends.
"""

from __future__ import annotations

import json
import re
from typing import Any

_encoder = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": "), allow_nan=False)
# Python writes lower-case hex; QEMU upper-case. A preceding escaped backslash (\\) must
# not be mistaken for the start of an escape, hence the alternation.
_ESCAPE = re.compile(r"\\\\|\\u([0-9a-f]{4})")


def _upper(match: re.Match[str]) -> str:
    hexdigits = match.group(1)
    if hexdigits is None:
        return match.group(0)
    return "\\u" + hexdigits.upper()


def encode(message: Any) -> bytes:
    """One QMP output line (ASCII, CRLF-terminated) for ``message``."""
    text = _encoder.encode(message)
    if "\\u" in text:
        text = _ESCAPE.sub(_upper, text)
    if "\x7f" in text:
        # DEL is outside what QEMU passes through unescaped; json leaves it raw.
        text = text.replace("\x7f", "\\u007F")
    return text.encode("ascii") + b"\r\n"
