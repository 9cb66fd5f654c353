#!/usr/bin/env python3
"""Migration handoff benchmark: qmp-server against QEMU, in the same run.

For 1, 16 and 64 qcow2 disks, migrate a running source to a destination started with
``-incoming defer`` over a UNIX socket, and measure from the QMP event timestamps:

* handoff downtime: source STOP to destination RESUME (the guest runs nowhere);
* total time: source MIGRATION ``setup`` until both sides report MIGRATION ``completed``
  (QEMU 7.2's source completes as soon as it has sent the stream, before the destination
  has activated its images; ours waits for the destination's acknowledgement, so the
  later of the two events is the fair end point).

The same is done with ``qemu-system-x86_64 -machine none`` and ``-blockdev`` disks, and
the ratio qmp-server/QEMU is printed (target: <= 0.5 at 64 disks). Each figure is the
median of ``--repeat`` runs.

    python bench/bench_migration.py [--disks 1,16,64] [--repeat 5] [--no-qemu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from migration_support import Server  # type: ignore[import-not-found]


@dataclass
class Sample:
    """One measurement, in milliseconds."""

    downtime_ms: float
    total_ms: float


def _ts(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


def _find(server: Server, label: str) -> dict[str, Any]:
    for event in server.client.events:
        name = event["event"]
        if name == "MIGRATION":
            name += ":" + event["data"]["status"]
        if name == label:
            found: dict[str, Any] = event
            return found
    raise AssertionError(f"{server.name}: no {label} in {server.labels()}")


def create_images(workdir: Path, disks: int) -> None:
    """Create ``disks`` empty 64 MiB qcow2 images (once) and sync them to disk."""
    for i in range(disks):
        image = workdir / f"d{i}.qcow2"
        if not image.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    # Fresh images leave dirty pages and journal behind, which would make the first runs'
    # fdatasync calls pay for them.
    os.sync()


def run_once(workdir: Path, disks: int, *, qemu: bool) -> Sample:
    """One migration between two fresh processes (QEMU's or ours); its two figures."""
    images = [workdir / f"d{i}.qcow2" for i in range(disks)]
    blockdevs: list[str] = []
    for i, image in enumerate(images):
        blockdevs += ["-blockdev", f"driver=qcow2,node-name=disk{i},file.driver=file,file.filename={image}"]
    tag = "qemu" if qemu else "ours"
    src = Server(f"{tag}-src", blockdevs, workdir, qemu=qemu)
    dst = Server(f"{tag}-dst", ["-incoming", "defer", *blockdevs], workdir, qemu=qemu)
    try:
        for server in (src, dst):
            server.connect()
            server.enable_events()
        uri = f"unix:{workdir / (tag + '-mig.sock')}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        if src.wait_for("MIGRATION:completed", "MIGRATION:failed", timeout=60) != "MIGRATION:completed":
            raise AssertionError(f"{tag}: migration failed: {src.cmd('query-migrate')}")
        dst.wait_for("MIGRATION:completed", timeout=60)
        downtime = _ts(_find(dst, "RESUME")) - _ts(_find(src, "STOP"))
        end = max(_ts(_find(src, "MIGRATION:completed")), _ts(_find(dst, "MIGRATION:completed")))
        total = end - _ts(_find(src, "MIGRATION:setup"))
        return Sample(downtime * 1000, total * 1000)
    finally:
        src.close()
        dst.close()


def median(samples: list[Sample]) -> Sample:
    """The median of each figure."""
    return Sample(statistics.median(s.downtime_ms for s in samples),
                  statistics.median(s.total_ms for s in samples))


def main() -> int:
    """Run every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disks", default="1,16,64", help="comma-separated disk counts")
    parser.add_argument("--repeat", type=int, default=5, help="runs per configuration (median)")
    parser.add_argument("--no-qemu", action="store_true", help="measure qmp-server only")
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img is needed to create the images", file=sys.stderr)
        return 1
    with_qemu = not args.no_qemu and shutil.which("qemu-system-x86_64") is not None
    counts = [int(n) for n in args.disks.split(",")]
    print(f"{'disks':>5} | {'downtime ms':>11} {'QEMU':>8} {'ratio':>6} | "
          f"{'total ms':>9} {'QEMU':>8} {'ratio':>6}")
    print("-" * 66)
    with tempfile.TemporaryDirectory(prefix="bench-migration-") as tmp:
        workdir = Path(tmp)
        for disks in counts:
            create_images(workdir, disks)
            kinds = [False, True] if with_qemu else [False]
            for qemu in kinds:
                run_once(workdir, disks, qemu=qemu)  # warm-up, not counted
            runs: dict[bool, list[Sample]] = {qemu: [] for qemu in kinds}
            for _ in range(args.repeat):
                # Alternate, so that background noise hits both alike.
                for qemu in kinds:
                    runs[qemu].append(run_once(workdir, disks, qemu=qemu))
            ours = median(runs[False])
            if with_qemu:
                theirs = median(runs[True])
                print(f"{disks:>5} | {ours.downtime_ms:>11.1f} {theirs.downtime_ms:>8.1f} "
                      f"{ours.downtime_ms / theirs.downtime_ms:>6.2f} | {ours.total_ms:>9.1f} "
                      f"{theirs.total_ms:>8.1f} {ours.total_ms / theirs.total_ms:>6.2f}")
            else:
                print(f"{disks:>5} | {ours.downtime_ms:>11.1f} {'-':>8} {'-':>6} | "
                      f"{ours.total_ms:>9.1f} {'-':>8} {'-':>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
