"""The node agent: load (source, peers, pod runtime) → plan (mesh.plan) → apply (Envoy, tunnels, datapath)."""
