"""blockdev-create (file, qcow2) against QEMU 7.2: the same commands on both, then the
images' bytes, ``qemu-img info``/``check``, and every job error text compared."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from server_support import Client, running

MiB = 1 << 20


def _wait_concluded(client: Client, job: str) -> dict[str, Any]:
    while True:
        event = client.wait_event("JOB_STATUS_CHANGE")
        if event["data"] == {"status": "concluded", "id": job}:
            break
    info: dict[str, Any] = next(j for j in client.cmd("query-jobs") if j["id"] == job)
    client.cmd("job-dismiss", id=job)
    return info


def _create(client: Client, job: str, options: dict[str, Any]) -> dict[str, Any]:
    client.cmd("blockdev-create", job_id=job, options=options)
    return _wait_concluded(client, job)


def _make_qcow2(work: Path, qemu: bool, options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    path = work / ("qemu.qcow2" if qemu else "ours.qcow2")
    with running([], work, "q" if qemu else "o", qemu=qemu) as (_, client):
        assert "error" not in _create(client, "f", {"driver": "file", "filename": str(path), "size": 0})
        client.cmd("blockdev-add", driver="file", filename=str(path), node_name="file")
        info = _create(client, "c", {"driver": "qcow2", "file": "file", **options})
    return path, info


def _img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], capture_output=True,
                         text=True, check=True)
    data: dict[str, Any] = json.loads(out.stdout)
    for key in ("filename", "actual-size"):
        data.pop(key, None)
    return data


CASES = [
    pytest.param({"size": 64 * MiB}, id="defaults"),
    pytest.param({"size": 0}, id="empty"),
    pytest.param({"size": 64 * MiB, "backing-file": "base.img", "backing-fmt": "raw"}, id="backing"),
    pytest.param({"size": 1 << 30, "cluster-size": 512}, id="512-byte-clusters-grow-refcounts"),
    pytest.param({"size": 1 << 40, "cluster-size": 4096, "refcount-bits": 1}, id="1TiB-refcount-bits-1"),
    pytest.param({"size": 8 << 30, "version": "v2"}, id="v2"),
    pytest.param({"size": 1 << 30, "lazy-refcounts": True, "refcount-bits": 64,
                  "compression-type": "zstd"}, id="lazy-64-zstd"),
    pytest.param({"size": MiB, "cluster-size": 2 * MiB, "backing-file": "x" * 300}, id="2MiB-clusters"),
    pytest.param({"size": 1 << 44, "cluster-size": 512}, id="l1-too-large"),
]


@pytest.mark.parametrize("options", CASES)
def test_qcow2_image_as_qemu_writes_it(tmp_path: Path, qemu_system: str, qemu_img: str,
                                       options: dict[str, Any]) -> None:
    theirs, their_job = _make_qcow2(tmp_path, True, options)
    ours, our_job = _make_qcow2(tmp_path, False, options)
    assert our_job == their_job
    assert ours.read_bytes() == theirs.read_bytes()
    if "backing-file" not in options:
        assert _img_info(ours) == _img_info(theirs)
        check = subprocess.run(["qemu-img", "check", str(ours)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "No errors were found on the image." in check.stdout


ERROR_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("file", {"driver": "file", "filename": "@TMP@/b.img", "size": 0}),
    ("qcow2", {"driver": "qcow2", "file": "f", "size": MiB}),
    ("add", {}),
    ("lock", {"driver": "file", "filename": "@TMP@/b.img", "size": MiB}),
    ("conflict", {"driver": "qcow2", "file": "f", "size": MiB}),
    ("nonode", {"driver": "qcow2", "file": "nonode", "size": MiB}),
    ("ro", {"driver": "qcow2", "file": "ro", "size": MiB}),
    ("align", {"driver": "qcow2", "file": "ro", "size": 1000}),
    ("cs1000", {"driver": "qcow2", "file": "ro", "size": MiB, "cluster-size": 1000}),
    ("cs256", {"driver": "qcow2", "file": "ro", "size": MiB, "cluster-size": 256}),
    ("cs4m", {"driver": "qcow2", "file": "ro", "size": MiB, "cluster-size": 4 * MiB}),
    ("v2lazy", {"driver": "qcow2", "file": "ro", "size": MiB, "version": "v2", "lazy-refcounts": True}),
    ("v2bits", {"driver": "qcow2", "file": "ro", "size": MiB, "version": "v2", "refcount-bits": 8}),
    ("v2zstd", {"driver": "qcow2", "file": "ro", "size": MiB, "version": "v2", "compression-type": "zstd"}),
    ("bits3", {"driver": "qcow2", "file": "ro", "size": MiB, "refcount-bits": 3}),
    ("bits128", {"driver": "qcow2", "file": "ro", "size": MiB, "refcount-bits": 128}),
    ("fmt", {"driver": "qcow2", "file": "ro", "size": MiB, "backing-fmt": "raw"}),
    ("prealloc", {"driver": "file", "filename": "@TMP@/c.img", "size": MiB, "preallocation": "metadata"}),
    ("hint", {"driver": "file", "filename": "@TMP@/c.img", "size": MiB, "extent-size-hint": 1 << 33}),
    ("full", {"driver": "file", "filename": "@TMP@/d.img", "size": MiB, "preallocation": "full"}),
    ("falloc", {"driver": "file", "filename": "@TMP@/e.img", "size": MiB, "preallocation": "falloc"}),
    ("nodir", {"driver": "file", "filename": "@TMP@/no/e.img", "size": MiB}),
]


def _error_session(client: Client, work: Path) -> list[Any]:
    seen: list[Any] = []
    for job, options in ERROR_STEPS:
        if job == "add":
            client.cmd("blockdev-add", driver="qcow2", node_name="q", file="f")
            client.cmd("blockdev-add", driver="file", node_name="ro", filename=str(work / "b.img"),
                       read_only=True)
            continue
        options = json.loads(json.dumps(options).replace("@TMP@", str(work)))
        info = _create(client, job, options)
        seen.append(json.loads(json.dumps(info).replace(str(work), "@TMP@")))
        if job == "file":
            client.cmd("blockdev-add", driver="file", node_name="f", filename=str(work / "b.img"))
    for name in ("d.img", "e.img"):
        seen.append((name, (work / name).stat().st_size))
    return seen


def test_errors_as_qemu(tmp_path: Path, qemu_system: str) -> None:
    results = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        with running([], work, qemu=qemu) as (_, client):
            results.append(_error_session(client, work))
    theirs, ours = results
    assert ours == theirs
    errors = {j["id"]: j.get("error") for j in ours if isinstance(j, dict)}
    assert errors["lock"] == 'Failed to get "write" lock'
    assert errors["conflict"].startswith("Permission conflict on node 'f': permissions 'write, resize' "
                                         "are both required by an unnamed block device")
    assert errors["align"] == "Image size must be a multiple of 512 bytes"


def test_refused_before_any_job(tmp_path: Path) -> None:
    with running([], tmp_path) as (_, client):
        for driver in ("raw", "null-co"):
            reply = client.execute("blockdev-create", {"job-id": "j", "options": {"driver": driver}})
            assert reply == {"error": {"class": "GenericError",
                                       "desc": "Driver does not support blockdev-create"}}
        reply = client.execute("blockdev-create", {"job-id": "j", "options": {
            "driver": "raw", "file": "x", "size": 512}})
        assert reply["error"]["desc"] == "Parameter 'options.size' is unexpected"  # QEMU 7.2's text
        assert client.cmd("query-jobs") == []


def test_typical_flow(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """blockdev-create file -> blockdev-add -> blockdev-create qcow2 -> blockdev-add qcow2,
    then guest writes; qemu-img and qemu-io agree with what was written."""
    path = tmp_path / "disk.qcow2"
    with running([], tmp_path) as (proc, client):
        _create(client, "f", {"driver": "file", "filename": str(path), "size": 0})
        client.cmd("blockdev-add", driver="file", filename=str(path), node_name="file0")
        _create(client, "q", {"driver": "qcow2", "file": "file0", "size": 16 * MiB})
        client.cmd("blockdev-add", driver="qcow2", node_name="disk0", file="file0")
        out = client.qemu_io("disk0 \"write -P 0x5a 1M 64k\"")
        assert "wrote 65536/65536 bytes" in out
        nodes = client.cmd("query-named-block-nodes")
        assert nodes[0]["node-name"] == "disk0" and nodes[0]["image"]["virtual-size"] == 16 * MiB
        client.cmd("quit")
        proc.wait(timeout=20)  # the images are closed cleanly before the process ends
    check = subprocess.run([qemu_img, "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout
    read = subprocess.run([qemu_io, "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 1M", str(path)],
                          capture_output=True, text=True)
    assert read.returncode == 0, read.stdout + read.stderr
    assert "Pattern verification failed" not in read.stdout


def test_inline_file_node(tmp_path: Path, qemu_system: str, qemu_img: str) -> None:
    """A qcow2 created on a file node given inline: the node exists only for the job."""
    results = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        path = work / "inline.qcow2"
        with running([], work, qemu=qemu) as (_, client):
            _create(client, "f", {"driver": "file", "filename": str(path), "size": 0})
            info = _create(client, "q", {"driver": "qcow2", "size": 4 * MiB,
                                         "file": {"driver": "file", "filename": str(path)}})
            results.append((info, client.cmd("query-named-block-nodes"), path.read_bytes()))
    assert results[0] == results[1]
    assert results[1][1] == []
