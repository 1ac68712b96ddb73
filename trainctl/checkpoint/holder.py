"""A node's memory-tier holder: replicates its ranks' memory steps to peers and assembles the
step a relaunch restores (`trainctl.checkpoint.memory` has the design and the layout).

It runs inside the node agent (a server thread and a replication thread), so it outlives the
workers and dies with the node. `configure` gives it the attempt's holders; `tick` (its
thread, every `TICK_S`) replicates the newest step whose manifest exists, writes commit records
when every node acked, and drops old steps; `assemble` (the agent, before torchrun starts)
builds ``restore/`` from the best verified copies here and at the peers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Iterable

from trainctl.checkpoint.checksum import format_checksum
from trainctl.checkpoint.layout import (
    MANIFEST_NAME,
    MEMORY_BASE,
    node_memory_root,
    parse_step_dir,
    step_dir_name,
)
from trainctl.checkpoint.manifest import Manifest
from trainctl.checkpoint.memory import (
    OWN_SOURCE,
    REPLICA_SOURCE,
    acks_complete,
    restore_tier_of,
    ring_peers,
    steps_to_drop,
)
from trainctl.checkpoint.peer_wire import (
    PeerError,
    PeerServer,
    fetch_file,
    list_files,
    put_bytes,
)

log = logging.getLogger(__name__)

TICK_S = 0.02
"""How often the holder looks for a new step to replicate."""
BANDWIDTH = 1e9
"""Bytes/s one holder sends to its peers at most (replication must leave the network to the
durable tier's uploads and the training's collectives)."""
STATUS_NAME = "status.json"
"""``restore/status.json``: which step was assembled, from where, how long it took, why not."""


@dataclasses.dataclass(frozen=True)
class PeerSet:
    """The holders of one attempt: its nodes in plan order and their endpoints (host:port)."""

    attempt: int
    endpoints: dict[str, str]
    replicas: int

    @property
    def nodes(self) -> list[str]:
        return list(self.endpoints)

    def hosts(self) -> dict[str, str]:
        return {node: end.rsplit(":", 1)[0] for node, end in self.endpoints.items()}


@dataclasses.dataclass(frozen=True)
class Assembly:
    """What `Holder.assemble` built: the step (None: none), its tier, seconds, bytes fetched
    from peers, and every copy or step it skipped, with why."""

    step: int | None
    tier: str | None
    seconds: float
    fetched_bytes: int
    skipped: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class AssemblyFailed(Exception):
    """A step could not be assembled (no valid copy of one of its objects)."""


def _crc(data: bytes | bytearray) -> str:
    return format_checksum(zlib.crc32(data))


def _steps_in(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return sorted(s for s in (parse_step_dir(n) for n in os.listdir(folder)) if s is not None)


class Holder:
    """The memory tier of node `node` of job `job_id` on this host, served on `host`."""

    def __init__(
        self,
        job_id: str,
        node: str,
        token: str,
        host: str,
        base: str = MEMORY_BASE,
        bandwidth: float = BANDWIDTH,
    ) -> None:
        self.node = node
        self.root = node_memory_root(job_id, node, base)
        self.token = token
        self.bandwidth = bandwidth
        self.peers: PeerSet | None = None
        self._lock = threading.Lock()
        self._received: set[str] = set()
        self._replicated: set[int] = set()
        self._stop = threading.Event()
        self.server = PeerServer(self.root, token, host, on_put=self._received.add).start()
        # Started by the first `configure`: a job without the memory tier never configures,
        # and its agents keep no thread polling every TICK_S.
        self._thread = threading.Thread(target=self._loop, name="trainctl-holder", daemon=True)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def configure(self, peers: PeerSet) -> None:
        """Serve the attempt `peers` (this node among them) from now on."""
        with self._lock:
            self.peers = peers
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()

    # ------------------------------------------------------------------ replication (thread)

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # the tier is an optimisation: never kill the agent for it
                log.exception("memory holder %s", self.node)

    def tick(self) -> None:
        """One pass: share a manifest rank 0 wrote here, replicate the newest step, commit
        steps every node acked, drop old steps."""
        with self._lock:
            peers = self.peers
            if peers is None or self.node not in peers.endpoints:
                return
            manifested = [
                s for s in _steps_in(self.path("own")) if os.path.exists(self._manifest(s))
            ]
            newest = max(manifested, default=None)
            if newest is not None and newest not in self._replicated:
                self._replicated.add(newest)
                self._replicate(newest, peers)
            self._commit_ready()
            self._collect_garbage()

    def _manifest(self, step: int, where: str = "own") -> str:
        return self.path(where, step_dir_name(step), MANIFEST_NAME)

    def _replicate(self, step: int, peers: PeerSet) -> None:
        name = step_dir_name(step)
        manifest_path = self._manifest(step)
        with open(manifest_path, "rb") as file:
            manifest_bytes = file.read()
        manifest = Manifest.from_json(manifest_bytes)
        others = [n for n in peers.nodes if n != self.node]
        if f"own/{name}/{MANIFEST_NAME}" not in self._received:  # rank 0 wrote it here
            for peer in others:
                self._put(peers, peer, f"own/{name}/{MANIFEST_NAME}", manifest_bytes)
        files = []
        for record in manifest.objects:
            local = self.path("own", name, record.path)
            if os.path.exists(local):
                with open(local, "rb") as file:
                    data = file.read()
                if len(data) != record.size or _crc(data) != record.checksum:
                    log.warning("memory step %d: %s fails its checksum: not acked", step, local)
                    return
                files.append((record.path, data))
        for target in ring_peers(peers.nodes, self.node, peers.replicas, peers.hosts()):
            for relative, data in files:
                if not self._put(peers, target, f"held/{self.node}/{name}/{relative}", data):
                    return  # no ack: this step never commits
        ack = json.dumps({"attempt": peers.attempt, "nodes": peers.nodes}).encode()
        self._write(f"acks/{name}/{self.node}", ack)
        for peer in others:
            self._put(peers, peer, f"acks/{name}/{self.node}", ack)

    def _put(self, peers: PeerSet, node: str, relative: str, data: bytes) -> bool:
        try:
            put_bytes(peers.endpoints[node], self.token, relative, data, self.bandwidth)
        except PeerError as error:
            log.warning("memory holder %s: %s to %s: %s", self.node, relative, node, error)
            return False
        return True

    def _write(self, relative: str, data: bytes) -> None:
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp", "wb") as file:
            file.write(data)
        os.replace(f"{path}.tmp", path)

    def _commit_ready(self) -> None:
        for step in _steps_in(self.path("acks")):
            name = step_dir_name(step)
            if os.path.exists(self.path("commit", name)):
                continue
            acks = {}
            for node in os.listdir(self.path("acks", name)):
                if node.endswith(".tmp") or ".part-" in node:
                    continue
                with open(self.path("acks", name, node), "rb") as file:
                    acks[node] = json.loads(file.read())
            mine = acks.get(self.node)
            if mine is None:
                continue
            same = [n for n, ack in acks.items() if ack["attempt"] == mine["attempt"]]
            complete, _why = acks_complete(same, mine["nodes"])
            if complete:
                self._write(f"commit/{name}", json.dumps(mine).encode())

    def committed_steps(self) -> list[int]:
        return _steps_in(self.path("commit"))

    def _collect_garbage(self) -> None:
        committed = self.committed_steps()
        present = set(_steps_in(self.path("own"))) | set(_steps_in(self.path("acks")))
        held = self.path("held")
        for source in os.listdir(held) if os.path.isdir(held) else []:
            present |= set(_steps_in(os.path.join(held, source)))
        for step in steps_to_drop(committed, present):
            self._drop(step)
        restoring = _steps_in(self.path("restore"))
        if restoring and committed and committed[-1] > restoring[0]:
            shutil.rmtree(self.path("restore"), ignore_errors=True)

    def _drop(self, step: int) -> None:
        name = step_dir_name(step)
        for folder in ("own", "acks", "commit"):
            target = self.path(folder, name)
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.exists(target):
                os.unlink(target)
        held = self.path("held")
        for source in os.listdir(held) if os.path.isdir(held) else []:
            shutil.rmtree(os.path.join(held, source, name), ignore_errors=True)
        self._replicated.discard(step)

    # ------------------------------------------------------------------ restore (the agent)

    def assemble(self) -> Assembly:
        """Build ``restore/`` for the attempt just configured: the newest step committed here
        or at any reachable peer, every object from its best verified copy (own copies, here
        then at peers, before replicas). Writes ``restore/status.json`` (`Assembly`)."""
        started = time.perf_counter()
        with self._lock:
            peers = self.peers or PeerSet(0, {}, 0)
            listings = self._peer_listings(peers)
            committed = set(self.committed_steps())
            for names in listings.values():
                committed |= {
                    s for s in (parse_step_dir(n) for n in names if n.startswith("commit/")) if s
                }
            building = self.path("restore.next")
            shutil.rmtree(building, ignore_errors=True)
            skipped: list[str] = []
            step, sources, fetched = None, [OWN_SOURCE], 0
            for candidate in sorted(committed, reverse=True)[:2]:
                try:
                    sources, fetched = self._build(candidate, listings, peers, building, skipped)
                except AssemblyFailed as failed:
                    skipped.append(str(failed))
                    shutil.rmtree(building, ignore_errors=True)
                    continue
                step = candidate
                break
            if step is None and not committed:
                skipped.append("no committed memory step on any reachable node")
            assembly = Assembly(
                step,
                restore_tier_of(sources) if step is not None else None,
                time.perf_counter() - started,
                fetched,
                tuple(skipped),
            )
            os.makedirs(building, exist_ok=True)
            with open(os.path.join(building, STATUS_NAME), "w") as file:
                file.write(assembly.to_json())
            shutil.rmtree(self.path("restore"), ignore_errors=True)
            os.replace(building, self.path("restore"))
            self._forget_newer_than(max(committed, default=0))
            return assembly

    def _peer_listings(self, peers: PeerSet) -> dict[str | None, list[str]]:
        listings: dict[str | None, list[str]] = {}
        for node, endpoint in peers.endpoints.items():
            if node == self.node:
                continue
            try:
                listings[node] = list_files(endpoint, self.token, ".")
            except PeerError as error:
                log.info("memory holder %s: peer %s unreachable: %s", self.node, node, error)
        return listings

    def _local_names(self) -> list[str]:
        names = []
        for folder, _dirs, files in os.walk(self.root):
            names += [os.path.relpath(os.path.join(folder, f), self.root) for f in files]
        return names

    @staticmethod
    def _copies(
        name: str, relative: str, listings: list[tuple[str | None, list[str]]]
    ) -> Iterable[tuple[str, str | None, str]]:
        """(source kind, peer or None for here, path) of every copy of one object, best first:
        own copies (here, then at peers) before replicas."""
        for kind, wanted in ((OWN_SOURCE, f"own/{name}/{relative}"), (REPLICA_SOURCE, None)):
            for node, names in listings:
                for path in names:
                    replica = path.startswith("held/") and path.endswith(f"/{name}/{relative}")
                    if path == wanted or (wanted is None and replica):
                        yield kind, node, path

    def _read(self, node: str | None, path: str, peers: PeerSet) -> bytes | bytearray:
        if node is None:
            with open(self.path(path), "rb") as file:
                return file.read()
        return fetch_file(peers.endpoints[node], self.token, path)

    def _build(
        self,
        step: int,
        listings: dict[str | None, list[str]],
        peers: PeerSet,
        building: str,
        skipped: list[str],
    ) -> tuple[list[str], int]:
        name = step_dir_name(step)
        everywhere = [(None, self._local_names()), *listings.items()]
        manifest_bytes: bytes | bytearray = b""
        for _kind, node, path in self._copies(name, MANIFEST_NAME, everywhere):
            try:
                manifest_bytes = self._read(node, path, peers)
                manifest = Manifest.from_json(bytes(manifest_bytes))
                break
            except (OSError, ValueError) as bad:
                skipped.append(f"{node or self.node}:{path}: {bad}")
        else:
            raise AssemblyFailed(f"memory step {step}: no manifest on any reachable node")
        sources: list[str] = []
        fetched = 0
        for record in manifest.objects:
            for kind, node, path in self._copies(name, record.path, everywhere):
                where = f"{'memory' if kind == OWN_SOURCE else 'peer'} tier: {node or self.node}"
                try:
                    data = self._read(node, path, peers)
                except OSError as error:
                    skipped.append(f"{where}:{path}: {error}")
                    continue
                if len(data) != record.size or _crc(data) != record.checksum:
                    skipped.append(f"{where}:{path}: fails its checksum ({record.checksum})")
                    continue
                self._store(building, name, record.path, data)
                sources.append(kind)
                fetched += len(data) if node is not None else 0
                break
            else:
                raise AssemblyFailed(f"memory step {step}: no valid copy of {record.path}")
        self._store(building, name, MANIFEST_NAME, manifest_bytes)
        return sources, fetched

    @staticmethod
    def _store(building: str, name: str, relative: str, data: bytes | bytearray) -> None:
        path = os.path.join(building, name, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)

    def _forget_newer_than(self, step: int) -> None:
        """Drop what a previous attempt left above the newest committed step: the relaunch
        writes those steps again."""
        for folder in ("own", "acks"):
            for stale in _steps_in(self.path(folder)):
                if stale > step:
                    shutil.rmtree(self.path(folder, step_dir_name(stale)), ignore_errors=True)
        self._replicated = {s for s in self._replicated if s <= step}
        # Manifests received from the last attempt's rank 0: this node may be rank 0's now.
        self._received.clear()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.server.close()
