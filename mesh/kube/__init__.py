"""The Kubernetes API side without kopf: client, watch (KubeSource), indexer, translation, CR status."""
