"""`trainctl`: the typer app, global options and the one error boundary."""

from __future__ import annotations

import sys
from typing import Any

import typer

from trainctl.cli import cancel, ckpt, describe, health, jobs, launch, logs, report, resume
from trainctl.cli.console import NORMAL, QUIET, VERBOSE, terminal
from trainctl.cli.metrics import metrics
from trainctl.cli.top import top
from trainctl.errors import TrainctlError
from trainctl.exitcodes import ExitCode
from trainctl.storage_errors import translate

# typer >= 0.20 vendors click; find its ClickException without importing a private module.
_CLICK_EXCEPTION: Any = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"
)

app = typer.Typer(
    name="trainctl",
    help="Fault-tolerant distributed PyTorch training: launch, checkpoint, recover, inspect.",
    no_args_is_help=True,
    add_completion=False,
    # Locals can hold credentials: never print them.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _global_options(
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only errors and results."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="More detail on stderr."),
) -> None:
    terminal.verbosity = QUIET if quiet else VERBOSE if verbose else NORMAL


app.command("launch", context_settings={"allow_interspersed_args": True})(launch.launch)
app.command("resume")(resume.resume)
app.command("cancel")(cancel.cancel)
app.command("list")(jobs.list_jobs)
app.command("status")(jobs.status)
app.command("events")(jobs.events)
app.command("describe")(describe.describe)
app.command("logs")(logs.logs)
app.command("health")(health.health)
app.command("report")(report.report)
app.command("top")(top)
app.command("metrics")(metrics)
app.add_typer(ckpt.app, name="ckpt")


def main() -> None:
    """Console-script entry point: run the app; user errors become one line and an exit code."""
    try:
        # With standalone_mode off, click returns the code of a typer.Exit instead of exiting.
        result = app(standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except TrainctlError as error:
        terminal.error(str(error))
        sys.exit(int(error.exit_code))
    except KeyboardInterrupt:
        terminal.error("interrupted")
        sys.exit(int(ExitCode.FAILED))
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        terminal.error("aborted")
        sys.exit(int(ExitCode.FAILED))
    except _CLICK_EXCEPTION as exc:  # usage errors (bad flag, value out of range): exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as error:
        # A storage failure met outside the store's own boundary (a checkpoint backend call
        # that is not translated there): still one message, never botocore's traceback.
        storage = translate(error, None)
        if storage is None:
            raise
        terminal.error(str(storage))
        sys.exit(int(storage.exit_code))


if __name__ == "__main__":
    main()
