"""Progress where work is long: a rich bar on a terminal (stderr), one plain line now and then
when stderr is a file or a pipe, nothing with -q.

`Meter` is the one display (a bar of `done`/`total` with rate and ETA, or plain lines);
`StepProgress` drives one from a running job's record — a thread that reads the step the
controller already tracks, so the controller's loop does no more work than before.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trainctl.cli.console import QUIET, format_age, terminal
from trainctl.state import JobRecord

PLAIN_EVERY_FRACTION = 0.1
"""Without a terminal: a line each time another tenth of the work is done ..."""
PLAIN_EVERY_S = 30.0
"""... or when this long passed since the last line and something moved."""
POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class Reported:
    """What the last plain line said, and when."""

    done: float
    at: float


def plain_line_due(
    done: float, total: float | None, last: Reported | None, now: float, every_s: float
) -> bool:
    """Whether a plain progress line is due: the first one, the last one (all done), each
    further tenth of `total`, or `every_s` after the last line if `done` moved since."""
    if last is None:
        return True
    if done <= last.done:
        return False
    if total:
        if done >= total:
            return True
        step = total * PLAIN_EVERY_FRACTION
        if int(done // step) > int(last.done // step):
            return True
    return now - last.at >= every_s


def progress_text(
    label: str, done: float, total: float | None, rate: float | None, unit: str
) -> str:
    """``step 40/100 (40%), 3.2 steps/s, ETA 19s``: a plain progress line."""
    shown = f"{done:.0f}/{total:.0f} ({100 * done / total:.0f}%)" if total else f"{done:.0f}"
    text = f"{label} {shown}"
    if rate:
        text += f", {rate:.3g} {unit}/s"
        if total and done < total:
            text += f", ETA {format_age((total - done) / rate)}"
    return text


class Meter:
    """One progress display over `total` units (None: unknown): a bar on a terminal, plain
    lines otherwise (`plain_line_due`), nothing with -q. Use as a context manager; `update`
    may be called from any one thread."""

    def __init__(
        self,
        label: str,
        total: float | None,
        unit: str = "steps",
        clock: Callable[[], float] = time.monotonic,
        every_s: float = PLAIN_EVERY_S,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.clock, self.every_s = clock, every_s
        self.enabled = terminal.verbosity > QUIET
        self.live = self.enabled and terminal.console.is_terminal
        self._first: Reported | None = None
        self._last: Reported | None = None
        self._done = 0.0
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> Meter:
        if self.live:
            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=terminal.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
        return self

    @property
    def began(self) -> bool:
        """Whether `update` was called (the work has started)."""
        return self._first is not None

    def rate(self, now: float) -> float | None:
        """Units per second since the first update (a resumed job starts mid-way)."""
        first = self._first
        if first is None or now - first.at <= 0 or self._done <= first.done:
            return None
        return (self._done - first.done) / (now - first.at)

    def update(self, done: float, total: float | None = None, label: str | None = None) -> None:
        if not self.enabled:
            return
        now = self.clock()
        self.total = total if total is not None else self.total
        self.label = label or self.label
        self._done = done
        if self._first is None:
            self._first = Reported(done, now)
        rate = self.rate(now)
        if self._bar is not None and self._task is not None:
            shown = f"{rate:.3g} {self.unit}/s" if rate else ""
            self._bar.update(
                self._task, completed=done, total=self.total, description=self.label, rate=shown
            )
        elif plain_line_due(done, self.total, self._last, now, self.every_s):
            self._last = Reported(done, now)
            terminal.info(progress_text(self.label, done, self.total, rate, self.unit))

    def describe(self, label: str) -> None:
        """Relabel the bar (a terminal only: plain output says what happens in its own lines)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=label)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()


class StepProgress:
    """While a job runs here: its attempt starting (and restoring a checkpoint) as a line, then
    its steps to `max_steps` as a `Meter`, read from `record` (the controller's own, updated
    as workers report) by a polling thread."""

    def __init__(
        self, record: JobRecord, max_steps: int | None, resuming: bool, poll_s: float = POLL_S
    ) -> None:
        self.record, self.max_steps, self.poll_s = record, max_steps, poll_s
        self.resuming = resuming
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainctl-progress", daemon=True)
        self._meter = Meter("step", max_steps)
        # attempts of an earlier run (resume): not this run's to announce or to time
        self._started: set[int] = {attempt.number for attempt in record.attempts}

    def __enter__(self) -> StepProgress:
        if self._meter.enabled:
            self._meter.__enter__()
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Show what changed since the last poll (called by the thread; once more at exit)."""
        attempts = list(self.record.attempts)
        if not attempts or (attempts[-1].number in self._started and not self._meter.began):
            return  # this run's first attempt has not started yet
        attempt = attempts[-1]
        if attempt.first_step_at is None:
            restoring = self.resuming or attempt.number > 0
            self._meter.describe(
                f"attempt {attempt.number}: "
                + ("restoring the newest checkpoint" if restoring else "starting")
            )
            return
        if attempt.number not in self._started:
            self._meter.describe("step")
            self._started.add(attempt.number)
            restored = attempt.restored_step
            took = format_age(attempt.first_step_at - attempt.started_at)
            terminal.info(
                f"attempt {attempt.number}: "
                + (f"restored step {restored}, " if restored is not None else "")
                + f"first step after {took}"
            )
        if self.record.step is not None:
            self._meter.update(self.record.step)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self._meter.enabled:
            return
        self._stop.set()
        self._thread.join()
        self.poll()
        self._meter.__exit__(kind, error, trace)
