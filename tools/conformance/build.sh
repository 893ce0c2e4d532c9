#!/usr/bin/env bash
# Build what `make conformance` runs, from Go modules, into a cache outside the repo keyed by the
# Gateway API release: every run after the first is instant. Idempotent; one build at a time (flock).
#
#   conformance.test       the upstream suite (sigs.k8s.io/gateway-api/conformance) as a test binary:
#                          `go test -c` of tools/conformance (suite_test.go calls conformance.RunConformance)
#   echo-basic             sigs.k8s.io/gateway-api/conformance/echo-basic, static (CGO_ENABLED=0), built as
#                          upstream's docker/Dockerfile.echo-basic does (-trimpath -ldflags "-buildid= -s -w")
#   istio-<rev>/server,    Istio's echo app (istio.io/istio/pkg/test/echo/cmd/{server,client}, the revision of
#   istio-<rev>/client     tools/conformance/echo-advanced/go.mod): what echo-advanced (Istio's app image) holds
#
# The images made of them (tools/conformance/images.py) go to <release>/images/.
#
#   WEBB_CONFORMANCE_CACHE  cache root (default /var/cache/webb/conformance): <release>/..., gomod/, gocache/
#   WEBB_CONFORMANCE_JOBS   go build -p (default 2: the machine has 2 cores and is shared)
#
# Progress and timings go to stderr; stdout is NAME=PATH lines: release, out, suite, echo_basic, echo_advanced.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
release=$(sed -nE 's#^(require)?[[:space:]]*sigs\.k8s\.io/gateway-api/conformance (v[0-9.]+)( .*)?$#\2#p' "$here/go.mod" | head -n1)
istio=$(sed -nE 's#^(require)?[[:space:]]*istio\.io/istio (v[^ ]+)( .*)?$#\2#p' "$here/echo-advanced/go.mod" | head -n1)
[[ -n $release && -n $istio ]] || { echo "conformance-build: no release in tools/conformance/{,echo-advanced/}go.mod" >&2; exit 1; }
cache=${WEBB_CONFORMANCE_CACHE:-/var/cache/webb/conformance}
out=$cache/$release
istio_dir=$out/istio-${istio##*-}   # keyed by the commit of the pseudo-version
jobs=${WEBB_CONFORMANCE_JOBS:-2}

export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache GOTOOLCHAIN=local \
  GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
summary=()

# build WHAT OUT_DIR STAMP MODULE_DIR GO_ARGS...: `go GO_ARGS` in MODULE_DIR, where @OUT@ in an argument stands for a
# staging directory whose files are then moved into OUT_DIR; the wall time goes to OUT_DIR/STAMP
build() {
  local what=$1 dir=$2 stamp=$3 moddir=$4; shift 4
  command -v go >/dev/null || { echo "conformance-build: go is not installed" >&2; exit 1; }
  mkdir -p "$dir"
  staging=$(mktemp -d "$dir/.build.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
  trap "rm -rf '$staging'" EXIT
  echo "conformance-build: building $what (cold: minutes)" >&2
  local start seconds
  start=$(date +%s)
  local args=() a
  for a in "$@"; do args+=("${a//@OUT@/$staging}"); done
  (cd "$moddir" && nice -n 10 go "${args[@]}")
  seconds=$(( $(date +%s) - start ))
  for f in "$staging"/*; do mv -f "$f" "$dir/"; done
  echo "$seconds" > "$dir/$stamp"
  rm -rf "$staging"
  trap - EXIT
  summary+=("built $what in $seconds s -> $dir")
}

have() { local d=$1; shift; for b in "$@"; do [[ -x $d/$b ]] || return 1; done; }

if ! have "$out" conformance.test echo-basic || ! have "$istio_dir" server client; then
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  if ! have "$out" conformance.test; then
    build "the conformance suite $release" "$out" suite-build-seconds "$here" \
      test -c -p "$jobs" -trimpath -ldflags "-s -w" -o @OUT@/conformance.test .
  fi
  if ! have "$out" echo-basic; then
    build "echo-basic $release" "$out" echo-basic-build-seconds "$here" \
      build -p "$jobs" -trimpath -ldflags "-buildid= -s -w" -o @OUT@/echo-basic sigs.k8s.io/gateway-api/conformance/echo-basic
  fi
  if ! have "$istio_dir" server client; then
    build "Istio's echo server and client ($istio)" "$istio_dir" build-seconds "$here/echo-advanced" \
      build -p "$jobs" -trimpath -ldflags "-s -w" -o @OUT@/ istio.io/istio/pkg/test/echo/cmd/server \
      istio.io/istio/pkg/test/echo/cmd/client
  fi
  exec 9>&-
else
  summary+=("conformance suite, echo-basic $release, Istio echo ${istio##*-}: cached in $out")
fi

printf 'conformance-build: %s\n' "${summary[@]}" >&2
echo "release=$release"
echo "out=$out"
echo "suite=$out/conformance.test"
echo "echo_basic=$out/echo-basic"
echo "echo_advanced=$istio_dir"
