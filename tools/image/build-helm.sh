#!/usr/bin/env bash
# Build helm from the helm.sh/helm/v4 Go module (tools/helm/go.mod pins the release) into a cache
# outside the repo, keyed by the release: every run after the first is instant. Idempotent.
# The chart (charts/webb) is tested with it; nothing is fetched from a chart or container registry.
#
#   WEBB_HELM_CACHE   cache root (default /var/cache/webb/helm): <release>/helm, <release>/build-seconds,
#                     gomod/, gocache/
#   WEBB_HELM_JOBS    go build -p (default 2: the machine has 2 cores and is shared)
#
# Prints the path of the helm binary as its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
modules=$(cd "$here/../helm" && pwd)
release=$(sed -nE 's/^(require)?[[:space:]]*helm\.sh\/helm\/v4 (v[0-9.]+)( .*)?$/\2/p' "$modules/go.mod")
[[ -n $release ]] || { echo "build-helm: no helm.sh/helm/v4 release in $modules/go.mod" >&2; exit 1; }
cache=${WEBB_HELM_CACHE:-/var/cache/webb/helm}
out=$cache/$release

if [[ -x $out/helm ]]; then
  echo "build-helm: helm $release already built (cold build took $(cat "$out/build-seconds" 2>/dev/null || echo '?') s)" >&2
  echo "$out/helm"
  exit 0
fi
command -v go >/dev/null || { echo "build-helm: go is not installed" >&2; exit 1; }
mkdir -p "$cache"
exec 9>"$cache/.lock"  # one build at a time; another checkout may be building the same release
flock 9
if [[ -x $out/helm ]]; then echo "$out/helm"; exit 0; fi
export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache GOTOOLCHAIN=local \
  GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

# what helm's own Makefile stamps on a release build (helm version)
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$release -X helm.sh/helm/v4/internal/version.metadata="
ldflags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

staging=$(mktemp -d "$cache/.build-$release.XXXXXX")
chmod 755 "$staging"
trap 'rm -rf "$staging"' EXIT
echo "build-helm: building helm $release (cold: a few minutes)" >&2
start=$(date +%s)
(cd "$modules" && nice -n 10 go build -p "${WEBB_HELM_JOBS:-2}" -trimpath -ldflags "$ldflags" -o "$staging/helm" helm.sh/helm/v4/cmd/helm)
seconds=$(( $(date +%s) - start ))
echo "$seconds" > "$staging/build-seconds"
rm -rf "$out"
mv "$staging" "$out"
trap - EXIT
echo "build-helm: built helm $release in $seconds s into $out" >&2
echo "$out/helm"
