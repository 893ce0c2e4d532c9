#!/usr/bin/env bash
# Build fortio (Istio's load tool) from the fortio.org/fortio Go module (tools/fortio/go.mod pins
# the release) into a cache outside the repo, keyed by the release: every run after the first is
# instant. Idempotent. bench/l7.py runs it when the binary is missing. No upstream code is copied
# into the repo: go.mod/go.sum only.
#
#   WEBB_FORTIO_CACHE  cache root (default /var/cache/webb/fortio): <release>/fortio,
#                      <release>/build-seconds, gomod/, gocache/
#   WEBB_FORTIO_JOBS   go build -p (default 2: the machine has 2 cores and is shared)
#
# Prints the path of the fortio binary as its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
release=$(sed -nE 's/^(require)?[[:space:]]*fortio\.org\/fortio (v[0-9.]+)( .*)?$/\2/p' "$here/go.mod")
[[ -n $release ]] || { echo "build-fortio: no fortio.org/fortio release in $here/go.mod" >&2; exit 1; }
cache=${WEBB_FORTIO_CACHE:-/var/cache/webb/fortio}
out=$cache/$release

if [[ -x $out/fortio ]]; then
  echo "build-fortio: fortio $release already built (cold build took $(cat "$out/build-seconds" 2>/dev/null || echo '?') s)" >&2
  echo "$out/fortio"
  exit 0
fi
command -v go >/dev/null || { echo "build-fortio: go is not installed" >&2; exit 1; }
mkdir -p "$cache"
exec 9>"$cache/.lock"  # one build at a time; another checkout may be building the same release
flock 9
if [[ -x $out/fortio ]]; then echo "$out/fortio"; exit 0; fi
export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache GOTOOLCHAIN=local \
  GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

staging=$(mktemp -d "$cache/.build-$release.XXXXXX")
chmod 755 "$staging"
trap 'rm -rf "$staging"' EXIT
echo "build-fortio: building fortio $release (cold: a minute or two)" >&2
start=$(date +%s)
(cd "$here" && nice -n 10 timeout 1200 go build -p "${WEBB_FORTIO_JOBS:-2}" -trimpath -ldflags "-s -w" \
  -o "$staging/fortio" fortio.org/fortio)
seconds=$(( $(date +%s) - start ))
echo "$seconds" > "$staging/build-seconds"
rm -rf "$out"
mv "$staging" "$out"
trap - EXIT
echo "build-fortio: built fortio $release in $seconds s into $out" >&2
echo "$out/fortio"
