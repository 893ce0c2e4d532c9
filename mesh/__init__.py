"""Webb's brain: cluster model, pure reconcile, sources, node runtime, agent, CLI."""
