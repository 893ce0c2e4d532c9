"""``python -m mesh.operator``: the kopf operator, cluster-wide, one replica (standalone)."""

from mesh.operator.main import main

main()
