"""Entry point of the ``align`` command."""

from importlib.metadata import version

import typer

__all__ = ["app"]

app = typer.Typer(
    name="align", no_args_is_help=True, help="Align and distil LLMs on megatron-core."
)


@app.callback()
def main() -> None:
    """Align and distil LLMs on megatron-core."""


@app.command("version")
def show_version() -> None:
    """Print the installed version of every align package."""
    for dist in ("align-losses", "align-data", "align-core", "align-kd", "align-cli"):
        typer.echo(f"{dist} {version(dist)}")
