"""The `casa` command: registers the commands, maps failures to exit codes, nothing else."""
from __future__ import annotations

import os
import sys

import typer

from casa_cli.commands import classify, generate, load, profile, train, vsfa
from casa_cli.commands import eval, render
from casa_cli.commands.common import EXIT_RUNTIME, EXIT_USAGE

app = typer.Typer(
    name="casa", no_args_is_help=True, add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False,
    help="An in-model safety layer for (multimodal) language models: a hidden safe/unsafe "
         "token sharpened by a safety attention over the prompt (CASA).\n\n"
         "Exit codes: 0 ok, 1 runtime error, 2 usage error or bad input, "
         "3 unsafe with --fail-on-unsafe, 4 some records failed.",
)
app.command("load")(load.command)
app.command("classify")(classify.command)
app.command("generate")(generate.command)
app.command("profile")(profile.command)
app.command("train")(train.command)
app.command("eval")(eval.command)
app.command("render")(render.command)
app.add_typer(vsfa.app, name="vsfa")


def main() -> None:
    from casa_cli.inputs import InputError
    from casa_cli.output import OutputError, clean

    try:
        code = app(standalone_mode=False)  # a command's typer.Exit comes back as its code
    except typer.Exit as done:
        code = done.exit_code
    except typer.Abort:
        print("casa: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.BadParameter as err:  # names the option: "Invalid value for '--alpha': ..."
        fail(err.format_message(), EXIT_USAGE)
    except InputError as err:
        fail(str(err), EXIT_USAGE)
    except OutputError as err:
        fail(str(err), EXIT_RUNTIME if err.runtime else EXIT_USAGE)
    except typer.TyperException as err:  # typer's other usage errors: usage, then the message
        err.message = clean(err.message)
        err.show()
        sys.exit(err.exit_code)
    except Exception as err:  # the one place that turns any failure into one line
        if os.environ.get("CASA_DEBUG"):
            raise
        fail(f"{type(err).__name__}: {err}".splitlines()[0], EXIT_RUNTIME)
    sys.exit(code if isinstance(code, int) else 0)


def fail(message: str, code: int) -> None:
    """One line on stderr, user data in it escaped (`output.stderr`), and exit `code`."""
    from casa_cli.output import stderr

    stderr.print(f"casa: error: {message}")
    sys.exit(code)
