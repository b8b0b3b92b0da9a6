"""``python -m propstore.cli``: the same as the ``propstore`` command."""

from propstore.cli import main

main(prog_name="propstore")
