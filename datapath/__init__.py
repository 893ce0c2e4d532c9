"""Webb datapath: eBPF socket programs, their maps, and the libbpf binding."""
