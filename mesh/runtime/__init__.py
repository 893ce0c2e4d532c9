"""The local node runtime: pods as network namespaces and cgroups on one machine."""
