"""Workload identity (no networking: the mTLS tunnel is ``tunnel/``, which does not import this).

spiffe.py  the one place SPIFFE IDs are built and parsed (stdlib only: the planner uses it)
ca.py      the mesh CA (own root or a user intermediate), SPIFFE X.509 workload certificates,
           the SPIFFE ID in a peer's certificate (peer_spiffe_id)
store.py   a node's identities: issued on use, renewed at 2/3 of life, keys 0600, TLS contexts;
           IdentityStore is what the tunnel takes as its ``tunnel.session.Identities``
"""
