"""The root typer app. Each command group lives in its own module and registers itself here."""
from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from typer.core import TyperGroup

from manifests.errors import CxrError

WIDE = 200  # columns for tables when output goes to a file or pipe (rich would wrap at 80)


def _console(stream, stderr: bool = False) -> Console:
    """A terminal gets its own width; a file or pipe (nohup, SLURM logs) a wide one, so tables never wrap.

    `COLUMNS` in the environment wins, as rich documents.
    """
    interactive = bool(getattr(stream, "isatty", lambda: False)())
    width = None if interactive or os.environ.get("COLUMNS") else WIDE
    return Console(stderr=stderr, width=width)


console = _console(sys.stdout)
err_console = _console(sys.stderr, stderr=True)

class _Group(TyperGroup):
    """Turns every CxrError raised by a command into a one-line message and exit status 1."""

    def invoke(self, ctx):  # noqa: ANN001 - click's signature
        try:
            return super().invoke(ctx)
        except CxrError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="cxr",
    cls=_Group,
    help="Chest X-ray shard engine and lean trainer: build shards once, train many times.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    """Print a one-line user error and exit 1 (no traceback)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _register() -> None:
    # Imported here so each module can `from cli.app import app, console, fail`.
    import importlib

    for name in ("cli.manifest_cmd", "cli.shard_cmd", "cli.train_cmd", "cli.eval_cmd", "cli.demo_cmd", "cli.pipeline_cmd",
                 "cli.export_cmd"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def main() -> None:
    _register()
    try:
        app()
    except CxrError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
