"""``python -m mesh.cli``: the ``webb`` command."""

from mesh.cli.main import main

main()
