"""Reading how workers died: tracebacks at the end of stderr, torchrun's failure lines, the
kernel's OOM-killer lines (recorded texts, as torch 2.13 writes them)."""

from __future__ import annotations

from pathlib import Path

from trainctl.launch.evidence import (
    crash_evidence,
    last_traceback,
    oom_kills,
    traceback_errors,
    worker_deaths,
)
from trainctl.protocol import ErrorFile

RANK_PREFIXED = """\
[rank1]: Traceback (most recent call last):
[rank1]:   File "/work/tests/e2e/scripts/plain_ddp.py", line 35, in <module>
[rank1]:     main()
[rank1]:   File "/work/tests/e2e/scripts/plain_ddp.py", line 17, in main
[rank1]:     steps = int(os.environ.get("PLAIN_STEPS", "5"))
[rank1]:             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
[rank1]: ValueError: invalid literal for int() with base 10: 'not-a-number'
"""

CUDA_ON_CPU = """\
hello from 0
[default0]:Traceback (most recent call last):
[default0]:  File "/home/me/multigpu_torchrun.py", line 104, in <module>
[default0]:    main(args.save_every, args.total_epochs, args.batch_size)
[default0]:  File "/home/me/multigpu_torchrun.py", line 89, in main
[default0]:    ddp_setup()
[default0]:  File "/home/me/multigpu_torchrun.py", line 15, in ddp_setup
[default0]:    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
[default0]:  File "/venv/lib/python3.11/site-packages/torch/cuda/__init__.py", line 689, in \
set_device
[default0]:    torch._C._cuda_setDevice(device)
[default0]:AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'
"""

TORCHRUN_LOG = """\
[rank 0] step 10 loss 5.40 (2.7s)
W1204 05:42:46.545000 1233 torch/distributed/elastic/multiprocessing/api.py:1028] Sending \
process 1239 closing signal SIGTERM
E1204 05:42:46.644000 1233 torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: -9) local_rank: 0 (pid: 1238) of binary: /venv/bin/python
"""


def test_the_uncaught_exception_and_the_user_frame_it_came_from() -> None:
    assert last_traceback(RANK_PREFIXED) == (
        "ValueError: invalid literal for int() with base 10: 'not-a-number' "
        "(raised at /work/tests/e2e/scripts/plain_ddp.py:17 in main)"
    )
    # Raised inside torch, reported at the user's own innermost frame.
    assert last_traceback(CUDA_ON_CPU) == (
        "AttributeError: module 'torch._C' has no attribute '_cuda_setDevice' "
        "(raised at /home/me/multigpu_torchrun.py:15 in ddp_setup)"
    )


def test_a_handled_traceback_long_before_the_end_is_not_the_cause() -> None:
    later = RANK_PREFIXED + "".join(f"[rank 1] step {i}\n" for i in range(40))
    assert last_traceback(later) is None
    assert last_traceback("just output\n") is None


def test_chained_exceptions_report_the_last_one() -> None:
    chained = (
        'Traceback (most recent call last):\n  File "/a.py", line 1, in f\nKeyError: 1\n\n'
        "During handling of the above exception, another exception occurred:\n\n"
        'Traceback (most recent call last):\n  File "/a.py", line 3, in g\n'
        "RuntimeError: bad config\n"
    )
    assert last_traceback(chained) == "RuntimeError: bad config (raised at /a.py:3 in g)"


def test_traceback_errors_cover_only_ranks_without_an_error_file(tmp_path: Path) -> None:
    for rank, text in (("0", CUDA_ON_CPU), ("1", RANK_PREFIXED)):
        path = tmp_path / "run" / "attempt_0" / rank / "stderr.log"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    known = (ErrorFile("error.json", "KeyError: x", 1.0, "0"),)
    found = traceback_errors(str(tmp_path), known)
    assert [e.local_rank for e in found] == ["1"]
    assert found[0].message.endswith("[rank 1, local rank 1, from its stderr]")


def test_worker_signals_from_torchrun_log_and_oom_lines_from_the_kernel(tmp_path: Path) -> None:
    deaths = worker_deaths(TORCHRUN_LOG)
    assert [(d.local_rank, d.pid, d.code) for d in deaths] == [(0, 1238, -9)]
    assert crash_evidence(TORCHRUN_LOG)[0] == "local rank 0 (pid 1238) killed by SIGKILL"
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(
        "6,100,5,-;eth0: link up\n"
        "3,101,6,-;Out of memory: Killed process 1238 (python) total-vm:1kB, anon-rss:1kB\n"
        "3,102,7,-;Out of memory: Killed process 999 (other)\n"
    )
    assert oom_kills({1238}, str(kmsg)) == [
        "Out of memory: Killed process 1238 (python) total-vm:1kB, anon-rss:1kB"
    ]
    assert oom_kills({1238}, str(tmp_path / "absent")) == []
