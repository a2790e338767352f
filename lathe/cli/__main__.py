"""`python -m lathe.cli ...`: the same as the installed `lathe` command."""

from lathe.cli import app

app(prog_name="lathe")
