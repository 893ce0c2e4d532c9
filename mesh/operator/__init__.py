"""Webb on a Kubernetes API server.

- ``translate``: API objects (dicts, as the API server returns them) → model objects, through
  the same ``mesh.manifests`` parse functions as the standalone source; Kubernetes
  NetworkPolicy → an L3/L4 ``MeshPolicy``.
- ``indexer``: an in-memory, last-good index of those objects → ``ClusterState``.
- ``watch``: list+watch of the API into an indexer (no kopf): the node agent's source.
- ``status``: pure functions, CR status (conditions, per-node applied versions) from the
  indexer and the nodes' reports.
- ``handlers`` / ``main``: the kopf operator (kopf is imported only there).
"""
