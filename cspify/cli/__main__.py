"""``python -m cspify.cli``: the same as the ``cspify`` command."""

from cspify.cli import main

main()
