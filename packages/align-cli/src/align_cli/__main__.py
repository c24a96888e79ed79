"""``python -m align_cli``: the ``align`` command."""

from align_cli.main import app

app(prog_name="align")
