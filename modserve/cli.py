"""The `modserve` command line: thin wrappers over the library, one command per job."""

from __future__ import annotations

import typer

from modserve.errors import ModserveError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__
)


def fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except ModserveError as err:
        fail(err)
