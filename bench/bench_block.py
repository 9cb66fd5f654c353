#!/usr/bin/env python3
"""Block-layer benchmarks: qmp-server against QEMU, measured in the same run.

    python3 bench/bench_block.py [--nodes 1000] [--io-ops 2000]

Prints, for each measurement, our figure, QEMU's, the ratio (ours / QEMU's) and the
target from issue 3:
- blockdev-add of N qcow2 nodes: time per node (target <= 0.5x QEMU)
- query-named-block-nodes over 2N nodes (N qcow2 + their file nodes): time per call
  (target <= 0.05x QEMU)
- resident memory per idle qcow2 node (target <= 0.5x QEMU)
- qcow2 4 KiB random writes and 1 MiB sequential writes through HMP qemu-io, against
  `qemu-img bench` on the same kind of image (reported, no target)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SERVER = [sys.executable, "-m", "qmp_server"]
QEMU = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]


class Qmp:
    """Minimal blocking QMP client."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        message: dict[str, Any] = {"execute": name}
        if args:
            message["arguments"] = args
        self.sock.sendall(json.dumps(message).encode())
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']['desc']}")
            return reply["return"]

    def raw(self, name: str, **args: Any) -> bytes:
        """Send a command; return its reply line unparsed (events skipped)."""
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode())
        while True:
            line = self.file.readline()
            if not line.startswith(b'{"timestamp"'):
                return line

    def pipeline(self, messages: list[dict[str, Any]]) -> None:
        """Send all, then read all replies (what a busy management tool does)."""
        self.sock.sendall(b"".join(json.dumps(m).encode() for m in messages))
        pending = len(messages)
        while pending:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(reply["error"]["desc"])
            pending -= 1


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(kind: str, workdir: Path) -> tuple[subprocess.Popen[bytes], Qmp]:
    sock = workdir / f"{kind}.sock"
    argv = (SERVER if kind == "ours" else QEMU) + ["-qmp", f"unix:{sock},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, Qmp(sock)


def node_benchmarks(kind: str, images: list[Path], workdir: Path) -> dict[str, float]:
    proc, qmp = start(kind, workdir)
    try:
        time.sleep(0.2)
        rss_before = rss_kib(proc.pid)
        begin = time.perf_counter()
        for i, image in enumerate(images):
            qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": f"n{i}"},
                    file={"driver": "file", "filename": str(image)})
        add = (time.perf_counter() - begin) / len(images)
        time.sleep(0.2)
        rss_after = rss_kib(proc.pid)
        # Time until the whole reply has arrived (the client's own JSON parsing of ~1 MB is
        # the same for both servers and is left out). The first call is reported apart:
        # we build and cache each node's entry then; management tools poll repeatedly.
        timings = []
        for _ in range(7):
            begin = time.perf_counter()
            line = qmp.raw("query-named-block-nodes", flat=True)
            timings.append(time.perf_counter() - begin)
        nodes = json.loads(line)["return"]
        assert len(nodes) == 2 * len(images), len(nodes)
        return {"add": add, "query_first": timings[0], "query": statistics.median(timings[1:]),
                "rss_per_node_kib": (rss_after - rss_before) / len(images)}
    finally:
        proc.kill()
        proc.wait()


def io_benchmarks(kind: str, image: Path, workdir: Path, ops: int) -> dict[str, float]:
    proc, qmp = start(kind, workdir)
    try:
        qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "disk"},
                file={"driver": "file", "filename": str(image)})
        rng = random.Random(1)
        size = 1 << 30
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(ops)]
        hmp = [{"execute": "human-monitor-command",
                "arguments": {"command-line": f'qemu-io disk "write -q -P 0x5a {off} 4k"'}}
               for off in offsets]
        begin = time.perf_counter()
        qmp.pipeline(hmp)
        rand = ops * 4096 / (time.perf_counter() - begin) / (1 << 20)
        seq_ops = 256
        hmp = [{"execute": "human-monitor-command",
                "arguments": {"command-line": f'qemu-io disk "write -q -P 0x6b {i << 20} 1M"'}}
               for i in range(seq_ops)]
        begin = time.perf_counter()
        qmp.pipeline(hmp)
        seq = seq_ops / (time.perf_counter() - begin)
        return {"rand4k_mib_s": rand, "seq1m_mib_s": seq}
    finally:
        proc.kill()
        proc.wait()


def qemu_img_bench(image: Path, ops: int) -> dict[str, float]:
    def run(args: list[str]) -> float:
        begin = time.perf_counter()
        subprocess.run(["qemu-img", "bench", "-w", "-t", "writeback", "-d", "1", *args, str(image)],
                       check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - begin

    # qemu-img bench has no random pattern; a large step spreads the 4 KiB writes so each
    # allocates, as random writes into a fresh image do.
    rand = ops * 4096 / run(["-c", str(ops), "-s", "4k", "-S", str(512 << 10)]) / (1 << 20)
    seq = 256 / run(["-c", "256", "-s", "1M"])
    return {"rand4k_mib_s": rand, "seq1m_mib_s": seq}


def make_image(path: Path, size: str = "1G") -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)


def report(label: str, ours: float, qemu: float, unit: str, target: str = "") -> None:
    ratio = ours / qemu if qemu else float("inf")
    line = f"{label:<44} ours {ours:12.3f} {unit:<8} qemu {qemu:12.3f} {unit:<8} ratio {ratio:6.3f}x"
    print(line + (f"  (target {target})" if target else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--io-ops", type=int, default=2000)
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        sys.exit("QEMU is needed for the comparison: apt-get install qemu-utils qemu-system-x86")
    with tempfile.TemporaryDirectory(prefix="bench-block-") as tmp:
        workdir = Path(tmp)
        template = workdir / "template.qcow2"
        make_image(template, "64M")
        images = []
        for i in range(args.nodes):
            image = workdir / f"img{i}.qcow2"
            shutil.copyfile(template, image)
            images.append(image)
        ours = node_benchmarks("ours", images, workdir)
        qemu = node_benchmarks("qemu", images, workdir)
        report(f"blockdev-add, per qcow2 node ({args.nodes})", ours["add"] * 1e3, qemu["add"] * 1e3, "ms",
               "<= 0.5x")
        report(f"query-named-block-nodes ({2 * args.nodes} nodes)", ours["query"] * 1e3,
               qemu["query"] * 1e3, "ms", "<= 0.05x")
        report("  (first call, entries not yet cached)", ours["query_first"] * 1e3,
               qemu["query_first"] * 1e3, "ms")
        report("resident memory per idle qcow2 node", ours["rss_per_node_kib"], qemu["rss_per_node_kib"],
               "KiB", "<= 0.5x")
        for kind in ("ours", "qemu"):
            make_image(workdir / f"io-{kind}.qcow2")
        ours_io = io_benchmarks("ours", workdir / "io-ours.qcow2", workdir, args.io_ops)
        make_image(workdir / "bench.qcow2")
        qemu_io = qemu_img_bench(workdir / "bench.qcow2", args.io_ops)
        report("qcow2 4 KiB random writes (HMP qemu-io vs qemu-img bench)", ours_io["rand4k_mib_s"],
               qemu_io["rand4k_mib_s"], "MiB/s")
        report("qcow2 1 MiB sequential writes (HMP vs qemu-img bench)", ours_io["seq1m_mib_s"],
               qemu_io["seq1m_mib_s"], "MiB/s")


if __name__ == "__main__":
    main()
