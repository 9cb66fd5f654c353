#!/usr/bin/env python3
"""Run QEMU's own iotests against this server, with no wrapper.

QEMU's ``check`` script runs each test, with ``QEMU_PROG`` set to our installed entry
point (``qmp-server``) and the real ``qemu-img``/``qemu-io``/``qemu-nbd``/
``qemu-storage-daemon``. The tests come from QEMU's source tree at run time (they are
not part of this repository): ``--iotests DIR`` or ``$QMP_SERVER_QEMU_IOTESTS`` names
its ``tests/qemu-iotests`` folder (``.ci/run`` fetches it with ``apt-get source qemu``).

Everything a test writes goes to a scratch folder outside the repository: ``check`` is
started through a symbolic link in a build-like folder there (so that its elapsed-time
cache lands there too), with ``TEST_DIR`` and ``SOCK_DIR`` inside it. Each test runs in
its own ``check`` process, in its own session, killed with everything it started when
its timeout expires.

Usage::

    python3 tests/iotests_runner.py [--iotests DIR] [--timeout S] [TEST[:FMT] ...]

With no tests named, the list of docs/conformance.md runs. The image format is the
test's own choice (qcow2 when it supports qcow2) unless ``:FMT`` is given. The result
of each test is printed (pass, fail, not run, missing, timeout) with the reason, and for
a failure the first differing lines between the test's ``.out`` and what it printed.
The exit status is 0 when every test that ran passed (or differs from its ``.out``
only by the documented version differences of :data:`VERSION_DIFFERENCES`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: The variable .ci/run exports: QEMU's tests/qemu-iotests folder.
ENV_VAR = "QMP_SERVER_QEMU_IOTESTS"

#: Issue 11's starting list (those QEMU 7.2 does not have are reported as missing).
DEFAULT_TESTS = [
    "153", "182", "196", "234", "091", "181",
    "migration-permissions", "migrate-bitmaps-test", "backing-file-invalidation",
    "qcow2-internal-snapshots", "inactive-node-nbd",
]



@dataclass(frozen=True)
class VersionDifference:
    """One documented, deliberate difference between QEMU 7.2's output and ours.

    The server follows QEMU 10.x where 10.x changed what a client sees; a 7.2 ``.out``
    file then records the older behaviour. ``pattern`` matches the part of a line that
    differs; ``replacement`` None drops the whole line. Applied to both the reference and
    our output before they are compared (docs/conformance.md, "Version differences").
    """

    description: str
    pattern: re.Pattern[str]
    replacement: str | None = None

    def apply(self, lines: list[str]) -> list[str]:
        """``lines`` with this difference normalized away."""
        if self.replacement is None:
            return [line for line in lines if not self.pattern.search(line)]
        return [self.pattern.sub(self.replacement, line) for line in lines]


#: The source's MIGRATION ``device`` status between ``active`` and ``completed``: QEMU
#: 9.1+ always passes through it (7.2 only with pause-before-switchover).
MIGRATION_DEVICE = VersionDifference(
    "the migration source's MIGRATION 'device' event (QEMU 9.1+)",
    re.compile(r'^\{"data": \{"status": "device"\}, "event": "MIGRATION", '))

#: ``query-status`` lost ``singlestep`` in QEMU 8.1 (iotests.log prints sorted keys).
NO_SINGLESTEP = VersionDifference(
    "query-status without 'singlestep' (removed in QEMU 8.1)",
    re.compile(r'(\{"return": \{"running": (?:true|false), )"singlestep": (?:true|false), '), r"\1")

#: The other direction, for a newer QEMU's tests run by hand (docs/conformance.md, "QEMU
#: 10.0's newest tests"): their ``.out`` records the newer ``qemu-img snapshot -l`` table
#: (``VM_SIZE``/``VM_CLOCK`` headings, a four-digit hour, ``--`` for no icount) and this
#: machine's qemu-img is 7.2's. The table is qemu-img's, not the server's: both forms are
#: reduced to their values.
QEMU_IMG_SNAPSHOT_HEADING = VersionDifference(
    "qemu-img 7.2's snapshot table heading (the .out has a newer qemu-img's)",
    re.compile(r"^ID\s+TAG\s+VM[ _]SIZE\s+DATE\s+VM[ _]CLOCK\s+ICOUNT\s*$"),
    "ID TAG VM_SIZE DATE VM_CLOCK ICOUNT")
QEMU_IMG_SNAPSHOT_ROW = VersionDifference(
    "qemu-img 7.2's snapshot table rows (two-digit hour, no '--' icount)",
    re.compile(r"^(\d+)\s+(\S+)\s+(\S+) (yyyy-mm-dd hh:mm:ss)\s+0*(\d+:\d\d:\d\d\.\d{3})\s*(?:--)?\s*$"),
    r"\1 \2 \3 \4 \5")

#: Tests asserted to differ from their 7.2 ``.out`` only by these (tests/test_iotests.py),
#: and newer tests whose ``.out`` differs from this machine's 7.2 tools.
VERSION_DIFFERENCES: dict[str, tuple[VersionDifference, ...]] = {
    "234": (MIGRATION_DEVICE, NO_SINGLESTEP),
    "280": (MIGRATION_DEVICE, NO_SINGLESTEP),
    "qcow2-internal-snapshots": (QEMU_IMG_SNAPSHOT_HEADING, QEMU_IMG_SNAPSHOT_ROW),
}

#: check's final line for one test (not TAP: TAP leaves out the reason).
_STATUS = re.compile(
    r"^(?P<name>\S+)\s+(?P<status>pass|fail|not run)\s+\[[\d:]+\]\s+\[[\d:]+\]\s+"
    r"(?:[\d.]+s|\.\.\.)(?:\s+\(last: [\d.]+s\))?(?:\s+(?P<reason>.*))?$")


@dataclass
class Result:
    """One test's outcome."""

    test: str
    fmt: str
    status: str  # pass | fail | not run | missing | timeout | error
    reason: str = ""
    elapsed: float = 0.0
    first_difference: list[str] = field(default_factory=list)
    #: With a baseline: QEMU's own status under the same check, and whether our output
    #: equals QEMU's line for line (then a failure is the reference file's, not ours).
    qemu_status: str = ""
    same_as_qemu: bool = False
    #: A failure whose output equals the ``.out`` once the test's VERSION_DIFFERENCES
    #: are normalized away in both.
    only_version_differences: bool = False


def iotests_dir(explicit: str | None = None) -> Path | None:
    """QEMU's tests/qemu-iotests folder, or None when it is not available."""
    value = explicit or os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value)
    return path if (path / "check").is_file() and (path / "iotests.py").is_file() else None


def test_file(source: Path, test: str) -> Path | None:
    """The test's script: numbered tests at the top, named ones under tests/."""
    for candidate in (source / test, source / "tests" / test):
        if candidate.is_file():
            return candidate
    return None


def default_format(script: Path) -> str:
    """qcow2 when the test supports it (or any format), else its first format."""
    text = script.read_text(encoding="utf-8", errors="replace")
    formats: list[str] = []
    bash = re.search(r"^_supported_fmt\s+(.*)$", text, re.M)
    if bash:
        formats = bash.group(1).split()
    python = re.search(r"supported_fmts\s*=\s*\[([^\]]*)\]", text)
    if python:
        formats = re.findall(r"['\"]([\w-]+)['\"]", python.group(1))
    if not formats or "qcow2" in formats or "generic" in formats:
        return "qcow2"
    return formats[0]


def reference_output(script: Path, fmt: str, machine: str | None) -> Path:
    """The .out file check compares with (its own choice among the variants)."""
    for name in (f"{script.name}.out.{fmt}",
                 *( [f"{script.name}.{machine}.out"] if machine else [] )):
        if (script.parent / name).is_file():
            return script.parent / name
    return script.parent / f"{script.name}.out"


def _lines(path: Path) -> list[str]:
    """A text file's lines without their trailing spaces (check ignores those)."""
    return [line.rstrip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]


def first_difference(reference: Path, actual: Path, limit: int = 12) -> list[str]:
    """The first hunk's changed lines (trailing spaces ignored, as check does)."""
    if not reference.is_file() or not actual.is_file():
        return []
    expected, got = _lines(reference), _lines(actual)
    lines: list[str] = []
    for group in difflib.SequenceMatcher(None, expected, got, autojunk=False).get_grouped_opcodes(0):
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                continue
            lines += [f"-{line}" for line in expected[i1:i2]]
            lines += [f"+{line}" for line in got[j1:j2]]
        if lines:
            first_line = group[0][1] + 1
            lines.insert(0, f"@@ .out line {first_line}")
            break
    if len(lines) > limit:
        lines = [*lines[:limit], f"... ({len(lines) - limit} more lines in this hunk)"]
    return lines


#: The baseline's launcher: QEMU itself, minus ``-accel qtest`` (check always passes it;
#: Debian's QEMU is built without the qtest accelerator). Used for QEMU only, never for us.
_BASELINE_LAUNCHER = """#!{python}
import os, sys
args, out = sys.argv[1:], []
while args:
    arg = args.pop(0)
    if arg in ("-accel", "--accel") and args and args[0] == "qtest":
        args.pop(0)
        continue
    out.append(arg)
os.execv({real!r}, [{real!r}, *out])
"""


def baseline_program(real: str, scratch: Path) -> str:
    """A qemu-system-* launcher for the real QEMU (see _BASELINE_LAUNCHER)."""
    folder = scratch / "baseline-bin"
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / Path(real).name
    launcher.write_text(_BASELINE_LAUNCHER.format(python=sys.executable, real=real), encoding="utf-8")
    launcher.chmod(0o755)
    return str(launcher)


def equal_but_for(reference: Path, actual: Path, differences: tuple[VersionDifference, ...]) -> bool:
    """Both files exist, differ, and are equal once ``differences`` are normalized away."""
    if not differences or not reference.is_file() or not actual.is_file():
        return False
    expected, got = _lines(reference), _lines(actual)
    for difference in differences:
        expected, got = difference.apply(expected), difference.apply(got)
    return expected == got


def bad_output(test_dir: Path, script: Path) -> Path:
    """Where check left the test's ``.out.bad``: ``TEST_DIR`` itself (QEMU 7.2's check), or
    the test's own folder in it (newer check: ``FMT-PROTO-NAME``, e.g. QEMU 10.0's)."""
    name = f"{script.name}.out.bad"
    direct = test_dir / name
    if direct.is_file():
        return direct
    return next(iter(sorted(test_dir.glob(f"*/{name}"))), direct)


def same_output(ours: Path, theirs: Path) -> bool:
    """Both outputs exist and are equal line for line (trailing spaces ignored)."""
    if not ours.is_file() or not theirs.is_file():
        return False
    return _lines(ours) == _lines(theirs)


def _program(name: str, override: str | None = None) -> str:
    found = override or shutil.which(name)
    if not found:
        raise SystemExit(f"iotests_runner: {name} not found on PATH")
    return found


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(0.5)


def run_one(source: Path, test: str, fmt: str | None, scratch: Path, env: dict[str, str],
            timeout: float, tag: str = "test") -> Result:
    """Run one test through QEMU's check, in its own scratch folders."""
    script = test_file(source, test)
    if script is None:
        return Result(test, fmt or "", "missing", f"not in {source} (this QEMU's tests do not have it)")
    fmt = fmt or default_format(script)
    build = scratch / "build" / "tests" / "qemu-iotests"
    build.mkdir(parents=True, exist_ok=True)
    check = build / "check"
    target = (source / "check").resolve()
    if not check.is_symlink() or check.resolve() != target:
        check.unlink(missing_ok=True)
        check.symlink_to(target)
    safe = test.replace("/", "_")
    test_dir = scratch / tag / f"{safe}-{fmt}"
    if test_dir.exists():
        shutil.rmtree(test_dir)
    test_dir.mkdir(parents=True)
    # Unix socket paths are short: a folder of its own under the system's temp.
    sock_dir = Path(tempfile.mkdtemp(prefix="qmp-iot-"))
    child_env = {**env, "TEST_DIR": str(test_dir), "SOCK_DIR": str(sock_dir)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(check), f"-{fmt}", test], cwd=build, env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        result = Result(test, fmt, "timeout", f"killed after {timeout:.0f} s",
                        round(time.monotonic() - started, 1))
        result.first_difference = first_difference(
            reference_output(script, fmt, None), bad_output(test_dir, script))
        return result
    finally:
        _kill_group(proc)  # whatever the test left running
        shutil.rmtree(sock_dir, ignore_errors=True)
    elapsed = round(time.monotonic() - started, 1)
    text = output.decode("utf-8", "replace")
    status_line = None
    for line in re.split(r"[\r\n]+", text):
        match = _STATUS.match(line.strip())
        if match and match.group("name") == script.name:
            status_line = match
    if status_line is None:
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        return Result(test, fmt, "error", "check gave no result: " + " | ".join(tail), elapsed)
    reason = (status_line.group("reason") or "").strip()
    result = Result(test, fmt, status_line.group("status"), reason, elapsed)
    if result.status == "fail":
        machine = re.search(r"^QEMU_DEFAULT_MACHINE\s+--\s+(\S+)", text, re.M)
        reference = reference_output(script, fmt, machine.group(1) if machine else None)
        result.first_difference = first_difference(reference, bad_output(test_dir, script))
        result.only_version_differences = tag == "test" and equal_but_for(
            reference, bad_output(test_dir, script), VERSION_DIFFERENCES.get(test, ()))
    return result


def run(tests: list[str], source: Path, *, timeout: float = 120.0, scratch: Path | None = None,
        qemu_prog: str | None = None, keep: bool = False, baseline: str | None = None,
        report: bool = False) -> list[Result]:
    """Run each test (``NAME`` or ``NAME:FMT``) and return the results in order.

    With ``baseline`` (the real qemu-system-x86_64), a test that does not pass is run
    again with QEMU in our place: when QEMU fails it too and printed exactly what we
    printed, the result says so (``same_as_qemu``).
    """
    env = dict(os.environ)
    env.update({
        "QEMU_PROG": _program("qmp-server", qemu_prog),
        "QEMU_IMG_PROG": _program("qemu-img"),
        "QEMU_IO_PROG": _program("qemu-io"),
        "QEMU_NBD_PROG": _program("qemu-nbd"),
        # check insists that it exists; only tests of the storage daemon run it.
        "QSD_PROG": shutil.which("qemu-storage-daemon") or "/bin/false",
    })
    env.pop("QEMU_IOTESTS_REGEN", None)  # never rewrite QEMU's reference files
    own_scratch = scratch is None
    base = Path(tempfile.mkdtemp(prefix="qmp-server-iotests-")) if scratch is None else scratch
    base.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    try:
        for item in tests:
            name, _, fmt = item.partition(":")
            result = run_one(source, name, fmt or None, base, env, timeout)
            if baseline and result.status in ("fail", "timeout", "error") \
                    and not result.only_version_differences:
                theirs = run_one(source, name, result.fmt, base,
                                 {**env, "QEMU_PROG": baseline_program(baseline, base)}, timeout, tag="qemu")
                result.qemu_status = theirs.status
                script = test_file(source, name)
                assert script is not None
                dirname = f"{name.replace('/', '_')}-{result.fmt}"
                result.same_as_qemu = theirs.status == result.status == "fail" and same_output(
                    bad_output(base / "test" / dirname, script), bad_output(base / "qemu" / dirname, script))
            results.append(result)
            if report:
                print_result(result)
    finally:
        if own_scratch and not keep:
            shutil.rmtree(base, ignore_errors=True)
        elif report:
            print(f"# scratch kept in {base}")
    return results


def print_result(result: Result) -> None:
    reason = f"  {result.reason}" if result.reason else ""
    print(f"{result.test:28} {result.fmt:6} {result.status:8} {result.elapsed:6.1f}s{reason}", flush=True)
    if result.qemu_status:
        same = ", the same output as ours" if result.same_as_qemu else ""
        print(f"    QEMU itself: {result.qemu_status}{same}", flush=True)
    if result.only_version_differences:
        print("    only the documented version differences: "
              + "; ".join(d.description for d in VERSION_DIFFERENCES[result.test]), flush=True)
    for line in result.first_difference:
        print(f"    {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", help="test names, optionally NAME:FMT (default: issue 11's list)")
    parser.add_argument("--iotests", help=f"QEMU's tests/qemu-iotests folder (default: ${ENV_VAR})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per test (default 120)")
    parser.add_argument("--scratch", type=Path, help="scratch folder (default: a new temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    parser.add_argument("--qemu-prog", help="the server's entry point (default: qmp-server on PATH)")
    parser.add_argument("--baseline", metavar="QEMU",
                        help="also run failing tests with this real qemu-system-x86_64 and compare outputs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = parser.parse_args(argv)
    source = iotests_dir(args.iotests)
    if source is None:
        print(f"iotests_runner: no QEMU iotests folder (--iotests or ${ENV_VAR})", file=sys.stderr)
        return 2
    results = run(args.tests or DEFAULT_TESTS, source, timeout=args.timeout, scratch=args.scratch,
                  qemu_prog=args.qemu_prog, keep=args.keep, baseline=args.baseline, report=True)
    if args.json:
        print(json.dumps([asdict(result) for result in results], indent=1))
    return 0 if all(r.status in ("pass", "not run", "missing") or r.same_as_qemu or r.only_version_differences
                    for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
