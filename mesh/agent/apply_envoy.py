"""Plan → Envoy resources: the node Envoy's xDS snapshot for a plan."""

from __future__ import annotations

from collections.abc import Callable

from mesh.plan.node import NodePlan
from xds.cache import Snapshot
from xds.incremental import Translator
from xds.model import TrustBundle, WorkloadIdentity, workload_secret

# the node proxy's certificate and the mesh's trust bundle (made only when a plan needs them)
ProxyMtls = Callable[[], tuple[WorkloadIdentity, TrustBundle]]


def envoy_snapshot(plan: NodePlan, translator: Translator, proxy_mtls: ProxyMtls | None) -> Snapshot:
    """Listeners, routes, clusters, endpoints and secrets of ``plan``. The node proxy's
    certificate and the trust bundle go by SDS only when a cluster originates mTLS to another
    node (Envoy asks only for named secrets). ``translator`` builds only what changed since its
    last snapshot."""
    secrets, bundles = plan.secrets, tuple[TrustBundle, ...]()
    if proxy_mtls is not None and any(u.mtls_backends for u in plan.upstreams):
        cert, bundle = proxy_mtls()
        secrets, bundles = secrets + (workload_secret(cert),), (bundle,)
    return translator.snapshot(plan.http, plan.upstreams, plan.gateways, secrets, bundles)
