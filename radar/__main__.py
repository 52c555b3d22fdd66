"""`python -m radar` is the `radar` command."""

from radar.cli.app import app

app()
