"""`python -m radar` is the `radar` command."""

from radar.platform.cli import app

app()
