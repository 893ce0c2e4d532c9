"""The pure planner: ClusterState + node → NodePlan (no I/O, no adapter imported)."""
