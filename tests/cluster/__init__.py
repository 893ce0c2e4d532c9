"""A real one-node Kubernetes cluster (kubelet, containerd, CNI) on this machine: tests/cluster/node.py."""
