"""``python -m cspify``: the same as the ``cspify`` command."""

from cspify.cli import main

main()
