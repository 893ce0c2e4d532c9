"""SPIFFE IDs of workloads: ``spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>``.

The one place they are built and parsed. Standard library only, so the planner uses it too.
"""

from __future__ import annotations

import re


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """(trust domain, namespace, service account) of a workload SPIFFE ID; ValueError says why not."""
    m = re.fullmatch(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)", uri)
    if not m:
        raise ValueError(f"SPIFFE ID {uri!r}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>")
    return m.group(1), m.group(2), m.group(3)
