#!/usr/bin/env bash
# Build kube-apiserver and kubectl from the k8s.io/kubernetes Go module (tools/kube/go.mod
# pins the release and its staging modules) into a cache outside the repo, keyed by the
# release, so that every run after the first is instant. Idempotent.
#
#   WEBB_KUBE_CACHE   cache root (default /var/cache/webb/kube): <release>/kube-apiserver,
#                     <release>/kubectl, <release>/build-seconds, gomod/, gocache/
#   WEBB_KUBE_JOBS    go build -p (default 2: the machine has 2 cores and is shared)
#
# Prints the directory holding the binaries as its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
modules=$(cd "$here/../../tools/kube" && pwd)
release=$(sed -nE 's/^(require)?[[:space:]]*k8s\.io\/kubernetes (v[0-9.]+)( .*)?$/\2/p' "$modules/go.mod")
[[ -n $release ]] || { echo "build-apiserver: no k8s.io/kubernetes release in $modules/go.mod" >&2; exit 1; }
cache=${WEBB_KUBE_CACHE:-/var/cache/webb/kube}
out=$cache/$release

built() { [[ -x $out/kube-apiserver && -x $out/kubectl ]]; }
report_cached() {
  echo "build-apiserver: kube-apiserver and kubectl $release already built" \
    "(cold build took $(cat "$out/build-seconds" 2>/dev/null || echo '?') s)" >&2
  echo "$out"
}
if built; then report_cached; exit 0; fi

command -v go >/dev/null || { echo "build-apiserver: go is not installed" >&2; exit 1; }
mkdir -p "$cache"
# one build at a time (another checkout may be building the same release): wait, then look again
exec 9>"$cache/.lock"
flock 9
if built; then report_cached; exit 0; fi
export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache GOTOOLCHAIN=local \
  GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

# The version stamp `make` in kubernetes would give: kubectl's version-skew check and
# /version read it.
major=${release#v}; major=${major%%.*}
minor=${release#v"$major".}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$release -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

staging=$(mktemp -d "$cache/.build-$release.XXXXXX")
chmod 755 "$staging"
trap 'rm -rf "$staging"' EXIT
echo "build-apiserver: building kube-apiserver and kubectl $release (cold: many minutes)" >&2
start=$(date +%s)
(cd "$modules" && nice -n 10 go build -p "${WEBB_KUBE_JOBS:-2}" -trimpath -ldflags "$ldflags" \
  -o "$staging/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
seconds=$(( $(date +%s) - start ))
echo "$seconds" > "$staging/build-seconds"
rm -rf "$out"
mv "$staging" "$out"
trap - EXIT
echo "build-apiserver: built $release in $seconds s into $out" >&2
echo "$out"
