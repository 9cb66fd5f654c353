"""HMP's argument parsing (monitor/hmp.c monitor_parse_arguments), as far as our
commands' argument types need it: ``-x`` flags, ``s`` strings (one word or a
"double-quoted string") and ``b`` booleans (``on``/``off``), with QEMU's texts."""

from __future__ import annotations

from .sizes import C_SPACE

_HMP_STRING_LIMIT = 1023  # HMP parses each argument into a 1024-byte C buffer
_HMP_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


class HmpArgumentError(ValueError):
    """HMP rejected the arguments of a command.

    ``str(error)`` is QEMU's first monitor line, e.g. "qemu-io: string expected".
    :attr:`monitor_text` is the complete HMP response text (QEMU adds a "Try help" line),
    :attr:`stdout` what QEMU 7.2 printed to its own stdout while parsing (e.g.
    "unterminated string").
    """

    def __init__(self, message: str, command: str, stdout: str = "", *, newline: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.command = command
        self.stdout = stdout
        self._newline = newline

    @property
    def monitor_text(self) -> str:
        """The HMP response text, with "\\n" line ends."""
        return (self.message + ("\n" if self._newline else "")
                + f'Try "help {self.command}" for more information\n')


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in C_SPACE:
        pos += 1
    return pos


def hmp_string(text: str, pos: int, stdout: list[str]) -> tuple[str, int] | None:
    """HMP's ``get_str``: one word or "quoted string"; None if there is none."""
    pos = skip_space(text, pos)
    if pos >= len(text):
        return None
    chars: list[str] = []
    if text[pos] == '"':
        pos += 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\":
                # A backslash at the very end escapes the C string's terminating NUL.
                escaped = text[pos + 1] if pos + 1 < len(text) else "\0"
                pos += 2
                if escaped in _HMP_ESCAPES:
                    chars.append(_HMP_ESCAPES[escaped])
                else:
                    stdout.append(f"unsupported escape code: '\\{escaped}'\n")
                    return None
            else:
                chars.append(text[pos])
                pos += 1
        if pos >= len(text):
            stdout.append("unterminated string\n")
            return None
        pos += 1
    else:
        while pos < len(text) and text[pos] not in C_SPACE:
            chars.append(text[pos])
            pos += 1
    value = "".join(chars)
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) > _HMP_STRING_LIMIT:
        # The C buffer keeps whole bytes; a character cut in half is dropped.
        value = encoded[:_HMP_STRING_LIMIT].decode("utf-8", "ignore")
    return value, pos


def parse_arguments(command: str, spec: str, text: str) -> dict[str, str | bool]:
    """The arguments of ``command`` per its args_type ``spec`` (``"detach:-d,uri:s"``).

    Flags come first and are True when given; strings (``s``, block device names ``B``)
    and booleans (``b``) are required, except an optional string (``s?``), absent from the
    result when the line has no more words.
    Raises :class:`HmpArgumentError` with QEMU's text.
    """
    text = text.split("\0", 1)[0]
    result: dict[str, str | bool] = {}
    pos = 0
    specs = [item.split(":", 1) for item in spec.split(",") if item]
    flags = {kind[1]: name for name, kind in specs if kind.startswith("-")}
    for name in flags.values():
        result[name] = False
    while True:
        pos = skip_space(text, pos)
        if not (pos < len(text) and text[pos] == "-" and flags):
            break
        letter = text[pos + 1:pos + 2]
        if letter not in flags:
            raise HmpArgumentError(f"{command}: unsupported option -{letter}", command,
                                   newline=bool(letter))
        result[flags[letter]] = True
        pos += 2
    stdout: list[str] = []
    for name, kind in specs:
        if kind.startswith("-"):
            continue
        parsed = hmp_string(text, pos, stdout)
        if kind == "b":
            if parsed is None or parsed[0] not in ("on", "off"):
                raise HmpArgumentError("Expected 'on' or 'off'", command, "".join(stdout))
            result[name] = parsed[0] == "on"
        elif parsed is None and kind.endswith("?") and skip_space(text, pos) >= len(text):
            break  # an optional argument (``s?``) that is not there, nor any after it
        else:
            if parsed is None:
                # A block device name ("B" in args_type) has its own "expected" text.
                what = "block device name" if kind == "B" else "string"
                raise HmpArgumentError(f"{command}: {what} expected", command, "".join(stdout))
            result[name] = parsed[0]
        pos = parsed[1]
    if skip_space(text, pos) < len(text):
        raise HmpArgumentError(f"{command}: extraneous characters at the end of line", command)
    return result
