"""Workload identity and mTLS between nodes.

ca.py      the mesh CA (own root or a user intermediate), SPIFFE X.509 workload certificates
store.py   a node's identities: issued on use, renewed at 2/3 of life, keys 0600, TLS contexts
ktls.py    TLS 1.3 handshake in user space, record keys to the kernel (kTLS) or user-space TLS
tunnel.py  the node-to-node tunnel: dial / accept / relay (kernel splice), events with reasons
"""
