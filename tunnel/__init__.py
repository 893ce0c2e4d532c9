"""The node-to-node mTLS tunnel. Imports nothing of certs, mesh, xds or datapath: the node's
identities come in as ``session.Identities`` (``certs.store.IdentityStore`` is one), composed by
mesh.agent.tunnels, the tests and the bench.

ktls.py     TLS 1.3 handshake in user space, record keys to the kernel (kTLS) or user-space TLS
session.py  the tunnel: dial / accept / relay (kernel splice), the accepting server, events with reasons
accept.py   the one accept loop of its listeners (thread per connection, bounded, survives EMFILE)
"""
