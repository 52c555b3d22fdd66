"""The `radar` command line: each command is a thin caller of one operation (radar.ops)."""

from __future__ import annotations

import typer

from radar.cli import controller, decode, demo, draft, models_cmd, serve, tune

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Lossless speculative decoding with a learned draft controller.")

app.command()(decode.generate)
app.command()(decode.bench)
app.command()(demo.demo)
app.command()(controller.profile)
app.command()(controller.collect)
app.command()(controller.train)
app.command()(controller.simulate)
app.command()(controller.calibrate)
app.command()(tune.tune)
app.command("serve")(serve.serve)
app.command("train-draft")(draft.train_draft)
app.add_typer(models_cmd.models_app, name="models")


def main() -> None:  # pragma: no cover - console entry
    app()
