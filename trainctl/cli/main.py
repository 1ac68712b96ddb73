"""`trainctl`: the typer app, global options and the one error boundary."""

from __future__ import annotations

import copy
import importlib.metadata
import sys
from typing import Any

import typer
import typer.main

from trainctl.cli import cancel, ckpt, describe, health, jobs, launch, logs, report, resume
from trainctl.cli.console import QUIET, VERBOSE, terminal
from trainctl.cli.event_log import events
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
    add_completion=True,
    # Locals can hold credentials: never print them.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_text() -> str:
    """``trainctl X (torch Y, python Z)``, from the installed metadata (torch is not imported:
    that would cost a second at every start)."""

    def installed(name: str, fallback: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return fallback

    from trainctl import __version__

    python = ".".join(str(part) for part in sys.version_info[:3])
    torch = installed("torch", "not installed")
    return f"trainctl {installed('trainctl', __version__)} (torch {torch}, python {python})"


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(version_text() + "\n")
        raise typer.Exit(0)


@app.callback()
def _global_options(
    quiet: bool = typer.Option(
        False, "-q", "--quiet", help="Only errors and results (also after the command)."
    ),
    verbose: bool = typer.Option(
        False, "-v", "--verbose", help="More detail on stderr (also after the command)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version."
    ),
) -> None:
    _set_verbosity(quiet, verbose)


def _set_verbosity(quiet: bool, verbose: bool) -> None:
    """-q wins over -v, given anywhere; neither: leave what an earlier position set."""
    if quiet:
        terminal.verbosity = QUIET
    elif verbose and terminal.verbosity != QUIET:
        terminal.verbosity = VERBOSE


app.command("launch", context_settings={"allow_interspersed_args": True})(launch.launch)
app.command("resume")(resume.resume)
app.command("cancel")(cancel.cancel)
app.command("list")(jobs.list_jobs)
app.command("status")(jobs.status)
app.command("events")(events)
app.command("describe")(describe.describe)
app.command("logs")(logs.logs)
app.command("health")(health.health)
app.command("report")(report.report)
app.command("top")(top)
app.command("metrics")(metrics)
app.add_typer(ckpt.app, name="ckpt")

_VERBOSITY_OPTIONS = ("quiet", "verbose")


def cli() -> Any:
    """The click command of `app`, where the global -q/-v (defined once, on the callback) are
    also accepted after every subcommand: each command gets a copy of the callback's two
    options that sets the verbosity as it is parsed instead of passing a value on."""
    command = typer.main.get_command(app)
    shared = [p for p in command.params if p.name in _VERBOSITY_OPTIONS]

    def setter(name: str) -> Any:
        def callback(_ctx: Any, _param: Any, value: bool) -> None:
            if value:
                _set_verbosity(name == "quiet", name == "verbose")

        return callback

    def add_to(group: Any) -> None:
        for sub in getattr(group, "commands", {}).values():
            if hasattr(sub, "commands"):
                add_to(sub)
                continue
            for option in shared:
                copied = copy.copy(option)
                copied.expose_value = False
                copied.callback = setter(str(option.name))
                sub.params.append(copied)

    add_to(command)
    return command


def main() -> None:
    """Console-script entry point: run the app; user errors become one line and an exit code."""
    try:
        # With standalone_mode off, click returns the code of a typer.Exit instead of exiting.
        result = cli().main(prog_name="trainctl", standalone_mode=False)
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
