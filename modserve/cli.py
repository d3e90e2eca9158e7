"""The `modserve` command line: thin wrappers over the library, one command per job."""

from __future__ import annotations

import sys

import typer

from modserve.errors import ModserveError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__
)


def main() -> None:
    """Console entry: user errors print one red line naming the fault and exit 1."""
    try:
        app()
    except ModserveError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)
