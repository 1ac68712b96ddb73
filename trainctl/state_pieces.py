"""The job record in pieces (``state.json`` version 3): no store write grows with N or time.

A `JobRecord` holds every node's record and every attempt with its node list: 199 kB at
1,024 nodes, and it used to be rewritten whole at every state move. Version 3 stores it as::

    jobs/<id>/state.json               job-level fields, ``num_node_shards``, ``num_attempts``
    jobs/<id>/node-shards/<k>.json     the records of nodes k*64 .. k*64+63, in record order
    jobs/<id>/attempts/<n>.json        attempt n without its node list
    jobs/<id>/attempts/<n>.nodes.json  attempt n's node list (written when the attempt starts)

`StateWriter` writes only the pieces that changed since it last wrote: a node shard when a
record in it changed (a node's ``step`` alone does not count: the live progress view carries
every node's step, and the step is stored with the record when the shard is written for
another reason), an attempt when it changed, its node list once. Pieces go first and
``state.json`` last, so a reader never meets a ``state.json`` that names a missing piece.
Shards of 64, not a file per node: one node's move writes 64 small records (about 8 kB,
whatever N), and an attempt's start, which moves every node, writes N/64 files, not N.

`read_record` assembles the whole `JobRecord` from the pieces, or decodes a version 1/2
``state.json`` (the whole record in one file) as it is.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from trainctl.errors import CorruptStoreError, first_problem
from trainctl.state import STATE_VERSION, AttemptRecord, JobRecord, NodeRecord
from trainctl.store_files import StoreFiles

NODES_PER_SHARD = 64
"""Node records per ``node-shards/<k>.json``: what one node's move rewrites."""

_NODE = TypeAdapter(NodeRecord)
_ATTEMPT = TypeAdapter(AttemptRecord)
_NODE_KEY = tuple(f.name for f in dataclasses.fields(NodeRecord) if f.name != "step")
"""The node fields whose change rewrites the node's shard (every one but the live step)."""

Scrub = Callable[[Any], Any]


def state_url(job_url: str) -> str:
    return f"{job_url}/state.json"


def shard_url(job_url: str, index: int) -> str:
    return f"{job_url}/node-shards/{index}.json"


def attempt_url(job_url: str, number: int) -> str:
    return f"{job_url}/attempts/{number}.json"


def attempt_nodes_url(job_url: str, number: int) -> str:
    return f"{job_url}/attempts/{number}.nodes.json"


def _encode(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _encode_list(items: list[Any]) -> bytes:
    """``{"nodes": [...]}`` with one item a line: readable, and each line by json's C encoder
    (with `indent` it takes its pure-Python one, 15 ms for a whole 1,024-node record)."""
    lines = ",\n".join(json.dumps(item, sort_keys=True) for item in items)
    return ('{"nodes": [\n' + lines + "\n]}\n").encode()


def _node_key(node: NodeRecord) -> tuple[Any, ...]:
    return tuple(getattr(node, name) for name in _NODE_KEY)


def job_fields(record: JobRecord) -> dict[str, Any]:
    """``state.json``'s document: the record less its nodes and attempts, plus their counts."""
    fields = {
        f.name: getattr(record, f.name)
        for f in dataclasses.fields(JobRecord)
        if f.name not in ("nodes", "attempts")
    }
    data: dict[str, Any] = {**fields, "state": record.state.value, "version": STATE_VERSION}
    data["num_node_shards"] = -(-len(record.nodes) // NODES_PER_SHARD)
    data["num_attempts"] = len(record.attempts)
    return data


@dataclasses.dataclass
class WriteCount:
    """What one `StateWriter.write` stored: files and bytes."""

    files: int = 0
    bytes: int = 0


class StateWriter:
    """Writes a job's record as pieces, each only when it changed since this writer last
    wrote it (a new writer writes every piece once). Not thread-safe: one per journal."""

    def __init__(self, files: StoreFiles, job_url: str) -> None:
        self.files = files
        self.job_url = job_url
        self._shards: dict[int, tuple[tuple[Any, ...], ...]] = {}
        self._attempts: dict[int, dict[str, Any]] = {}
        self._attempt_nodes: dict[int, list[str]] = {}

    def write(self, record: JobRecord, scrub: Scrub = lambda data: data) -> WriteCount:
        """Store what changed in `record` (every piece passed through `scrub`), then
        ``state.json``, with ``updated_at`` stamped now. Returns what was written."""
        record.updated_at = time.time()
        pieces: dict[str, bytes] = {}
        shards: dict[int, tuple[tuple[Any, ...], ...]] = {}
        for index in range(0, len(record.nodes), NODES_PER_SHARD):
            shard = record.nodes[index : index + NODES_PER_SHARD]
            key = tuple(_node_key(node) for node in shard)
            if self._shards.get(index // NODES_PER_SHARD) != key:
                rows = scrub([_NODE.dump_python(node, mode="json") for node in shard])
                pieces[shard_url(self.job_url, index // NODES_PER_SHARD)] = _encode_list(rows)
                shards[index // NODES_PER_SHARD] = key
        attempts: dict[int, dict[str, Any]] = {}
        lists: dict[int, list[str]] = {}
        for attempt in record.attempts:
            number = attempt.number
            # An attempt's node list is set when it starts (a list replaced is seen): compared
            # by identity, so a save costs O(attempts), not O(attempts x N).
            if self._attempt_nodes.get(number) is not attempt.nodes:
                lists[number] = attempt.nodes
                pieces[attempt_nodes_url(self.job_url, number)] = _encode_list(attempt.nodes)
            data = _ATTEMPT.dump_python(attempt, mode="json", exclude={"nodes"})
            if self._attempts.get(number) != data:
                attempts[number] = data
                pieces[attempt_url(self.job_url, number)] = _encode(scrub(data))
        payload = _encode(scrub(job_fields(record)))
        self.files.write_many(pieces)
        self.files.write_atomic(state_url(self.job_url), payload)
        # Remembered only once stored: a write that failed is tried again next time.
        self._shards.update(shards)
        self._attempts.update(attempts)
        self._attempt_nodes.update(lists)
        return WriteCount(len(pieces) + 1, sum(map(len, pieces.values())) + len(payload))


def read_record(files: StoreFiles, job_url: str) -> JobRecord | None:
    """The job's whole record (None when it has no ``state.json``). Raises
    `CorruptStoreError` naming the file that is missing or does not fit."""
    url = state_url(job_url)
    data = files.read_json(url)
    if data is None:
        return None
    pieces: list[tuple[str, TypeAdapter[Any], Sequence[Any]]] = []
    if isinstance(data, dict) and "nodes" not in data and "num_attempts" in data:
        data, pieces = _assemble(files, job_url, data)
    try:
        return JobRecord.from_json(data)
    except ValueError as bad:
        # Name the piece that does not fit (validated one by one only on this path).
        for piece_url, adapter, items in pieces:
            for item in items:
                try:
                    adapter.validate_python(item)
                except ValidationError as worse:
                    raise CorruptStoreError(piece_url, first_problem(worse)) from None
        raise CorruptStoreError(url, str(bad)) from None


def _assemble(
    files: StoreFiles, job_url: str, data: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, TypeAdapter[Any], Sequence[Any]]]]:
    """The whole record's document from version 3's pieces (read concurrently on S3), and
    each piece's URL with its items and their type (to name a piece that does not fit)."""
    num_shards, num_attempts = data.pop("num_node_shards", 0), data.pop("num_attempts")
    if not isinstance(num_shards, int) or not isinstance(num_attempts, int):
        raise CorruptStoreError(state_url(job_url), "num_node_shards/num_attempts not integers")
    shards = [shard_url(job_url, k) for k in range(num_shards)]
    attempts = [attempt_url(job_url, n) for n in range(num_attempts)]
    lists = [attempt_nodes_url(job_url, n) for n in range(num_attempts)]
    found = files.read_many([*shards, *attempts, *lists])
    pieces: list[tuple[str, TypeAdapter[Any], Sequence[Any]]] = []
    nodes: list[Any] = []
    for url in shards:
        rows = _list_piece(url, found[url])
        nodes.extend(rows)
        pieces.append((url, _NODE, rows))
    records: list[Any] = []
    for url, list_url in zip(attempts, lists, strict=True):
        attempt = _piece(url, found[url])
        attempt["nodes"] = _list_piece(list_url, found[list_url])
        records.append(attempt)
        pieces.append((url, _ATTEMPT, [attempt]))
    return {**data, "nodes": nodes, "attempts": records}, pieces


def _piece(url: str, raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise CorruptStoreError(url, "missing (state.json counts it; the store lost it)")
    try:
        data = json.loads(raw)
    except ValueError as bad:
        raise CorruptStoreError(url, f"not JSON ({bad})") from None
    if not isinstance(data, dict):
        raise CorruptStoreError(url, "not a JSON object")
    return data


def _list_piece(url: str, raw: bytes | None) -> Sequence[Any]:
    nodes = _piece(url, raw).get("nodes")
    if not isinstance(nodes, list):
        raise CorruptStoreError(url, 'expected {"nodes": [...]}')
    return nodes
