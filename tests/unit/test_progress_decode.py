"""`decode_progress`, the controller's one-pass reader of progress lines, answers exactly as
`decode_line` does: the same envelope for every line it takes, nothing for a line it does not
(which `decode_line` then refuses or reads). Lines from `encode_line` always take the fast path."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from trainctl.protocol import (
    AGENT_MESSAGES,
    Envelope,
    Heartbeat,
    Progress,
    ProtocolError,
    decode_line,
    decode_progress,
    encode_line,
)

TOKEN = "t0ken"


def slow(raw: bytes) -> Envelope | None:
    try:
        return decode_line(raw, TOKEN, AGENT_MESSAGES)
    except ProtocolError:
        return None


def beat(rng: random.Random) -> Heartbeat:
    step = rng.randint(0, 10_000)
    samples = tuple(
        (s, rng.choice([None, rng.random()]), rng.choice([None, rng.random()]))
        for s in range(step - rng.randint(0, 3), step + 1)
    )
    return Heartbeat(
        step,
        rng.choice([None, 1.8e9 + rng.random()]),
        rng.choice([None, rng.random()]),
        rng.choice([None, rng.random()]),
        rng.random() < 0.2,
        samples,
    )


def test_every_line_encode_line_writes_takes_the_fast_path_to_the_same_envelope() -> None:
    rng = random.Random(3)
    for _ in range(300):
        ranks = {str(r): beat(rng) for r in range(rng.randint(0, 8))}
        envelope = Envelope(
            Progress(ranks), f"node-{rng.randint(0, 9)}", rng.choice([None, 0, 7]), rng.random()
        )
        raw = encode_line(envelope, TOKEN)
        fast = decode_progress(raw, TOKEN)
        assert fast is not None
        assert fast == slow(raw) == envelope


def mutations(fields: dict[str, Any]) -> list[Any]:
    """Lines one change away from a valid progress line (some still valid)."""
    rank = next(iter(fields["ranks"]))
    out: list[Any] = []
    for key, value in [
        ("token", "other"),
        ("token", None),
        ("node", ""),
        ("node", 7),
        ("attempt", True),
        ("attempt", "3"),
        ("attempt", 2.0),
        ("time", True),
        ("time", "1.5"),
        ("time", 3),
        ("type", "beat"),
        ("type", "hello"),
        ("ranks", []),
        ("ranks", {rank: {"step": "4"}}),
        ("ranks", {rank: {"step": 4.0}}),
        ("ranks", {rank: {"step": 4.5}}),
        ("ranks", {rank: {"step": True}}),
        ("ranks", {rank: {"step": 4, "samples": [[1, 2]]}}),
        ("ranks", {rank: {"step": 4, "samples": [["1", "0.5", None]]}}),
        ("ranks", {rank: {"step": 4, "saving": "yes"}}),
        ("ranks", {rank: {"step": 4, "unknown": 1}}),
        ("extra", {"anything": [1, 2]}),
    ]:
        out.append({**fields, key: value})
    for key in ("token", "node", "attempt", "time", "type", "ranks"):
        out.append({k: v for k, v in fields.items() if k != key})
    return out


@pytest.mark.parametrize("seed", range(5))
def test_a_line_it_takes_reads_as_decode_line_reads_it_and_the_rest_is_left_to_it(
    seed: int,
) -> None:
    rng = random.Random(seed)
    ranks = {str(r): beat(rng) for r in range(1, 4)}
    raw = encode_line(Envelope(Progress(ranks), "node-1", 2, 5.0), TOKEN)
    fields = json.loads(raw)
    lines = [json.dumps(m).encode() for m in mutations(fields)]
    lines += [b"", b"{", b"[]", b"null", raw[:-10], raw.replace(b"progress", b"Progress")]
    lines += [b"NaN", raw.replace(b'"step":', b'"step": ', 1), raw + raw]
    taken = 0
    for line in lines:
        fast = decode_progress(line, TOKEN)
        if fast is not None:
            taken += 1
            assert fast == slow(line), line
    assert taken >= 5  # the valid ones among the mutations are read on the fast path
