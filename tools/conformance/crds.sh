#!/usr/bin/env bash
# Print the directory of the Gateway API CRDs (YAML, one file per CRD) of the release that
# tools/conformance/go.mod pins, for a channel: standard (default) or experimental. They are read from
# the Go module cache (downloaded on first use), never copied into the repo:
#
#   d=$(bash tools/conformance/crds.sh)                  # standard channel; `crds.sh experimental`: + XMesh, XBackend...
#   kubectl apply --server-side $(printf -- '-f %s ' "$d"/gateway.networking*.yaml)
#
# (the experimental directory also holds a kustomization.yaml, which is no object: apply the files, or -k the directory).
# Python: tools.conformance.modules.crd_dir(channel), crd_files(channel).
#
# Install one channel only: the suite refuses CRDs of mixed channels or releases (-allow-crds-mismatch).
# In v1.6.3 the standard channel has TLSRoute, TCPRoute and UDPRoute too.
#   WEBB_CONFORMANCE_CACHE  as tools/conformance/build.sh (default /var/cache/webb/conformance): gomod/
set -euo pipefail

channel=${1:-standard}
case $channel in standard|experimental) ;; *) echo "crds.sh: channel standard or experimental, not '$channel'" >&2; exit 2;; esac
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${WEBB_CONFORMANCE_CACHE:-/var/cache/webb/conformance}
export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
dir=$(cd "$here" && go mod download -json sigs.k8s.io/gateway-api | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p')
crds=$dir/config/crd/$channel
[[ -d $crds ]] || { echo "crds.sh: no $crds" >&2; exit 1; }
echo "$crds"
