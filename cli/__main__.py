"""`python -m cli ...`: the `dataengine` command without its console script."""

from cli.app import app

app()
