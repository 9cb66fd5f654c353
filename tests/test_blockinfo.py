"""query-named-block-nodes stays exact while its entries are cached."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from blocklayer.graph import BlockGraph
from qmp_server.blockinfo import block_infos, block_infos_json
from qmp_server.protocol.encoding import encode


def fresh(graph: BlockGraph) -> list[dict[str, Any]]:
    return json.loads(encode({"return": block_infos(graph, True)}))["return"]  # type: ignore[no-any-return]


def cached(graph: BlockGraph) -> list[dict[str, Any]]:
    return json.loads(encode({"return": block_infos_json(graph, True)}))["return"]  # type: ignore[no-any-return]


def test_cached_entries_follow_every_change(tmp_path: Path, qemu_img: str) -> None:
    graph = BlockGraph()
    for i in range(3):
        image = tmp_path / f"{i}.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
        spec = {"driver": "file", "filename": str(image)}
        graph.open({"driver": "qcow2", "node-name": f"n{i}", "file": spec})
    steps = [
        lambda: None,
        lambda: graph.nodes["n1"].pwrite(0, b"x" * 65536),
        lambda: graph.nodes["n1"].flush(),
        lambda: graph.inactivate(graph.nodes["n2"]),
        lambda: graph.open({"driver": "null-co", "node-name": "extra"}),
        lambda: graph.delete("extra"),
        lambda: graph.activate(graph.nodes["n2"]),
    ]
    before = cached(graph)
    for step in steps:
        step()
        assert cached(graph) == fresh(graph)
    assert cached(graph) != before
    graph.close_all()


def test_inactive_file_grown_by_another_process_is_seen(tmp_path: Path, qemu_io: str) -> None:
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    graph = BlockGraph()
    graph.open({"driver": "qcow2", "node-name": "a", "file": {"driver": "file", "filename": str(image)}},
               inactive=True)
    sizes = {n["node-name"]: n["image"]["actual-size"] for n in cached(graph)}
    subprocess.run([qemu_io, "-c", "write 0 4M", str(image)], check=True, capture_output=True)
    grown = {n["node-name"]: n["image"]["actual-size"] for n in cached(graph)}
    assert grown["a"] > sizes["a"]
    assert cached(graph) == fresh(graph)
    graph.close_all()
