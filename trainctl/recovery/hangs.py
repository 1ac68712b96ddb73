"""Where a hang comes from: each silent rank's process state, stack and step, compared.

In synchronous training one stuck rank stalls every other rank at its next collective, so
silence alone does not localise a hang: every rank falls silent together. What does is where
each rank *is*. The agents dump every worker's Python stacks when a hang is detected
(`trainctl.launch.stacks`: py-spy, else faulthandler); `stack_position` reads the main thread's
innermost frame from either format, and whether it is inside torch (waiting in a collective,
an all-gather hook, backward's all-reduce) or in the job's own code. `localise_hang` then
names the rank (and so the node) that is not where the others are — stopped, in
uninterruptible sleep, running its own code while the others wait in torch, or a step behind —
and blames nobody when every rank is stuck at the same place (a deadlock in the job).

Pure: the texts and numbers come in, a node and a sentence go out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

_PY_SPY_FRAME = re.compile(r"^\s+(?P<func>\S.*?) \((?P<file>[^():]+):(?P<line>\d+)\)\s*$")
_FAULTHANDLER_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>.+)$')


@dataclasses.dataclass(frozen=True)
class StackPosition:
    """A rank's main thread, innermost frame first."""

    where: str
    """``function (file:line)`` of the innermost frame."""
    in_torch: bool
    """The innermost frame is torch's own code (a collective, a hook, backward)."""


def _main_thread(text: str) -> list[str]:
    """The lines of the main thread's block: py-spy's ``"MainThread"``, faulthandler's
    ``Current thread`` (the signal handler runs in the main thread), else the first block."""
    blocks: list[list[str]] = []
    main: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            blocks.append([])
            if '"MainThread"' in line or line.startswith("Current thread "):
                main = blocks[-1]
        elif blocks:
            blocks[-1].append(line)
    if main is not None:
        return main
    return blocks[0] if blocks else text.splitlines()


def stack_position(text: str | None) -> StackPosition | None:
    """Where the main thread of a dumped stack is (None: no frame could be read)."""
    if not text:
        return None
    for line in _main_thread(text):
        match = _PY_SPY_FRAME.match(line) or _FAULTHANDLER_FRAME.match(line)
        if match:
            file = match["file"]
            short = file.split("/site-packages/")[-1]
            in_torch = short.startswith("torch/") or "/torch/" in file
            return StackPosition(f"{match['func']} ({short}:{match['line']})", in_torch)
    return None


@dataclasses.dataclass(frozen=True)
class SilentRank:
    """One rank that made no progress within the hang timeout, as the controller saw it."""

    rank: int
    node: str | None
    """None: the rank never reported, so its node is unknown."""
    step: int | None
    """Last step it reported (None: none yet)."""
    silent_s: float
    process_state: str | None = None
    """The worker's /proc state letter from the stack dump (``T``: stopped, ``D``: in
    uninterruptible I/O, ``S``: sleeping, ...); None when unknown."""
    position: StackPosition | None = None
    """Where its main thread was, from the stack dump; None when unknown."""
    nccl_seq: int | None = None
    """The last NCCL collective it enqueued (flight recorder, GPUs); None when unknown."""
    nccl_pending: str | None = None


@dataclasses.dataclass(frozen=True)
class Hang:
    """No progress within the hang timeout; stacks were dumped before this was observed."""

    time: float
    timeout_s: float
    explanation: str
    """How the timeout was chosen, with its numbers (from `derive_hang_timeout`)."""
    ranks: tuple[SilentRank, ...]


def _one_node(ranks: Sequence[SilentRank]) -> str | None:
    nodes = {r.node for r in ranks}
    return ranks[0].node if ranks and len(nodes) == 1 and None not in nodes else None


def _ranks(ranks: Sequence[SilentRank]) -> str:
    return ", ".join(str(r.rank) for r in ranks)


def _by_position(hang: Hang) -> tuple[str | None, str] | None:
    """Ranks running their own code while every other dumped rank waits in torch."""
    known = [r for r in hang.ranks if r.position is not None]
    own = [r for r in known if r.position and not r.position.in_torch]
    waiting = [r for r in known if r.position and r.position.in_torch]
    node = _one_node(own)
    if own and waiting and node is not None:
        assert own[0].position is not None and waiting[0].position is not None
        return node, (
            f"rank {_ranks(own)} on {node} is running its own code at "
            f"{own[0].position.where} while rank {_ranks(waiting)} wait(s) in torch at "
            f"{waiting[0].position.where}"
        )
    places = {r.position.where for r in known if r.position}
    if len(known) == len(hang.ranks) > 1 and len(places) == 1 and not own:
        return None, f"every rank waits at {places.pop()}: a deadlock in the job, none blamed"
    return None


def localise_hang(hang: Hang) -> tuple[str | None, str]:
    """The node a hang points at, and why (None: not localised to one node).

    Evidence, strongest first: a worker process stopped (state ``T``/``t``) or in
    uninterruptible sleep (``D``); on GPUs, ranks of one node that never enqueued the NCCL
    collective the others wait in (the flight recorder's dumps); ranks of one node running
    their own code while the others wait in torch (from the stacks); ranks of one node behind
    the others' step. Blame only when
    the evidence points at exactly one node.
    """
    for states, what in (("Tt", "stopped"), ("D", "in uninterruptible sleep")):
        stuck = [r for r in hang.ranks if r.process_state and r.process_state in states]
        node = _one_node(stuck)
        if node is not None:
            letters = "/".join(sorted({str(r.process_state) for r in stuck}))
            return node, f"rank {_ranks(stuck)} on {node} is {what} (state {letters})"
    positioned = _by_position(hang)
    recorded = [r for r in hang.ranks if r.nccl_seq is not None]
    seqs = [r.nccl_seq or 0 for r in recorded]
    if len(recorded) > 1 and min(seqs) < max(seqs):
        behind = [r for r in recorded if r.nccl_seq == min(seqs)]
        node = _one_node(behind)
        if node is not None:
            ahead = next(r for r in recorded if r.nccl_seq == max(seqs))
            waits = f" waiting in {ahead.nccl_pending}" if ahead.nccl_pending else ""
            # The stacks say where the late rank is, when they agree on the node.
            stacks = f"; {positioned[1]}" if positioned and positioned[0] == node else ""
            return node, (
                f"rank {_ranks(behind)} on {node} never enqueued collective "
                f"#{max(seqs)} (it stopped at #{min(seqs)}) while rank {ahead.rank} is{waits} "
                f"(flight recorder){stacks}"
            )
    if positioned is not None and positioned[0] is not None:
        return positioned
    steps = [r.step if r.step is not None else -1 for r in hang.ranks]
    if steps and min(steps) < max(steps):
        behind = [r for r, step in zip(hang.ranks, steps, strict=True) if step == min(steps)]
        node = _one_node(behind)
        if node is not None:
            at = "no step" if min(steps) < 0 else f"step {min(steps)}"
            return node, (
                f"rank {_ranks(behind)} on {node} stuck at {at} while others reached step "
                f"{max(steps)}"
            )
    if positioned is not None:
        return positioned
    return None, "not localised to one node"


def describe_hang(hang: Hang) -> str:
    """The sentence for a hang: silent ranks, how long, the timeout's numbers, the suspect."""
    longest = max((r.silent_s for r in hang.ranks), default=0.0)
    _, where = localise_hang(hang)
    silent = ", ".join(f"{r.rank} ({r.node or 'node unknown'})" for r in hang.ranks)
    return (
        f"hang: no progress for {longest:.1f} s from rank(s) {silent}; {hang.explanation}; {where}"
    )
