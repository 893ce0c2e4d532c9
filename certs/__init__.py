"""Workload identity (SPIFFE X.509) and the kTLS tunnel: not built yet.

The walking skeleton carries no mTLS; issue 5 brings the CA, workload certificates, SDS
and the kernel-TLS tunnel. Nothing imports this package today.
"""
