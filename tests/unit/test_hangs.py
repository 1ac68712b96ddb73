"""Naming the hung rank from its stack: where each rank's main thread is (recorded dumps)."""

from __future__ import annotations

import pytest

from trainctl.recovery.hangs import Hang, SilentRank, StackPosition, localise_hang, stack_position

# py-spy 0.4 `dump`, as the agent stores it (short file names).
PY_SPY_WAITING = """\
Process 4242: /venv/bin/python -u recipes/tiny_gpt.py
Python v3.11.7 (/usr/bin/python3.11)

Thread 4250 (idle): "upload"
    wait (threading.py:327)
Thread 4242 (idle): "MainThread"
    all_reduce (torch/distributed/distributed_c10d.py:2806)
    wrapper (torch/distributed/c10d_logger.py:81)
    train (recipes/_trainer.py:112)
    main (recipes/tiny_gpt.py:88)
"""
PY_SPY_SPINNING = """\
Process 4243: /venv/bin/python -u recipes/tiny_gpt.py
Python v3.11.7 (/usr/bin/python3.11)

Thread 4243 (active): "MainThread"
    spin_forever (recipes/_trainer.py:41)
    train (recipes/_trainer.py:95)
    main (recipes/tiny_gpt.py:88)
"""
# faulthandler (SIGUSR2 in trainctl.runtime), full paths, the signal's thread first.
FAULTHANDLER_WAITING = """\
Thread 0x00007f0e5bfff6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 327 in wait

Current thread 0x00007f0e6a3c8740 (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/autograd/graph.py", line 829 in run_backward
  File "/venv/lib/python3.11/site-packages/torch/_tensor.py", line 647 in backward
  File "/work/recipes/_trainer.py", line 98 in train
"""


def test_the_main_thread_s_innermost_frame_and_whether_it_is_torch_s() -> None:
    assert stack_position(PY_SPY_WAITING) == StackPosition(
        "all_reduce (torch/distributed/distributed_c10d.py:2806)", True
    )
    assert stack_position(PY_SPY_SPINNING) == StackPosition(
        "spin_forever (recipes/_trainer.py:41)", False
    )
    assert stack_position(FAULTHANDLER_WAITING) == StackPosition(
        "run_backward (torch/autograd/graph.py:829)", True
    )
    assert stack_position(None) is None and stack_position("no frames here") is None


def rank(number: int, node: str, text: str | None, state: str = "S", step: int = 7) -> SilentRank:
    return SilentRank(number, node, step, 5.0, state, stack_position(text))


def hang(*ranks: SilentRank) -> Hang:
    return Hang(20.0, 4.0, "hang timeout 4 s, pinned by the recipe", ranks)


@pytest.mark.parametrize(
    ("ranks", "blamed", "why"),
    [
        # One rank loops in its own code; the other waits for it in a collective.
        (
            (rank(0, "node-0", PY_SPY_WAITING), rank(1, "node-1", PY_SPY_SPINNING)),
            "node-1",
            "rank 1 on node-1 is running its own code at spin_forever "
            "(recipes/_trainer.py:41) while rank 0 wait(s) in torch at all_reduce "
            "(torch/distributed/distributed_c10d.py:2806)",
        ),
        # Every rank waits at the same collective: a deadlock in the job, nobody blamed.
        (
            (rank(0, "node-0", PY_SPY_WAITING), rank(1, "node-1", PY_SPY_WAITING)),
            None,
            "every rank waits at all_reduce (torch/distributed/distributed_c10d.py:2806): "
            "a deadlock in the job, none blamed",
        ),
        # A stopped process is stronger evidence than any stack.
        (
            (rank(0, "node-0", PY_SPY_SPINNING), rank(1, "node-1", PY_SPY_WAITING, "T")),
            "node-1",
            "rank 1 on node-1 is stopped (state T)",
        ),
        # Every rank in its own code, same step: nothing points at one node.
        (
            (rank(0, "node-0", PY_SPY_SPINNING), rank(1, "node-1", PY_SPY_SPINNING)),
            None,
            "not localised to one node",
        ),
        # No stacks, a step behind: the step decides.
        (
            (rank(0, "node-0", None, step=8), rank(1, "node-1", None, step=7)),
            "node-1",
            "rank 1 on node-1 stuck at step 7 while others reached step 8",
        ),
    ],
)
def test_the_rank_not_where_the_others_are_is_named(
    ranks: tuple[SilentRank, ...], blamed: str | None, why: str
) -> None:
    assert localise_hang(hang(*ranks)) == (blamed, why)
