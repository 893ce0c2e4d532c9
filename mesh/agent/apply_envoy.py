"""Plan → Envoy resources: the node Envoy's xDS snapshot for a plan."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mesh.plan.node import NodePlan
from xds.cache import Snapshot
from xds.model import TrustBundle, WorkloadIdentity, workload_secret
from xds.resources import build_items

# the node proxy's certificate and the mesh's trust bundle (made only when a plan needs them)
ProxyMtls = Callable[[], tuple[WorkloadIdentity, TrustBundle]]


def envoy_snapshot(plan: NodePlan, access_log: Path, proxy_mtls: ProxyMtls | None, previous: Snapshot | None) -> Snapshot:
    """Listeners, routes, clusters, endpoints and secrets of ``plan``. The node proxy's
    certificate and the trust bundle go by SDS only when a cluster originates mTLS to another
    node (Envoy asks only for named secrets). Entries equal to ``previous``'s are shared."""
    secrets, bundles = plan.secrets, tuple[TrustBundle, ...]()
    if proxy_mtls is not None and any(u.mtls_backends for u in plan.upstreams):
        cert, bundle = proxy_mtls()
        secrets, bundles = secrets + (workload_secret(cert),), (bundle,)
    return Snapshot.stream(build_items(list(plan.http), str(access_log), list(plan.upstreams), plan.gateways, secrets, bundles),
                           previous=previous)
