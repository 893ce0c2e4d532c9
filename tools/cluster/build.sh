#!/usr/bin/env bash
# Build what the one-node test cluster (tests/cluster) runs that Debian does not ship, into
# caches outside the repo, so that every run after the first is instant. Idempotent.
#
#   kubelet, kube-controller-manager,  k8s.io/kubernetes at the release of tools/cluster/go.mod
#   kube-scheduler                      (= tools/kube/go.mod's), next to kube-apiserver and
#                                       kubectl in $WEBB_KUBE_CACHE/<release>, with the same Go
#                                       caches (gomod/, gocache/) the apiserver build filled
#   kube-apiserver, kubectl             tests/kube/build-apiserver.sh (run first; instant if built)
#   coredns                             github.com/coredns/coredns (tools/cluster/coredns/go.mod)
#                                       -> $WEBB_COREDNS_CACHE/<release>/coredns
#   pause                               tools/cluster/pause (static) -> $WEBB_PAUSE_CACHE/<source hash>/pause
#
#   WEBB_KUBE_CACHE     default /var/cache/webb/kube
#   WEBB_COREDNS_CACHE  default /var/cache/webb/coredns
#   WEBB_PAUSE_CACHE    default /var/cache/webb/pause
#   WEBB_KUBE_JOBS      go build -p (default 2: the machine has 2 cores and is shared)
#
# Progress and timings go to stderr; stdout is three lines, NAME=DIR: kube=..., coredns=..., pause=...
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
release_of() {  # release_of GO.MOD MODULE
  sed -nE "s#^(require)?[[:space:]]*$2 (v[0-9.]+)( .*)?\$#\\2#p" "$1" | head -n1
}
kube_release=$(release_of "$here/go.mod" k8s.io/kubernetes)
apiserver_release=$(release_of "$repo/tools/kube/go.mod" k8s.io/kubernetes)
coredns_release=$(release_of "$here/coredns/go.mod" github.com/coredns/coredns)
[[ -n $kube_release && -n $coredns_release ]] || { echo "cluster-build: no release found in the go.mod files" >&2; exit 1; }
if [[ $kube_release != "$apiserver_release" ]]; then
  echo "cluster-build: tools/cluster/go.mod has $kube_release, tools/kube/go.mod $apiserver_release: keep them in step" >&2
  exit 1
fi

kube_cache=${WEBB_KUBE_CACHE:-/var/cache/webb/kube}
coredns_cache=${WEBB_COREDNS_CACHE:-/var/cache/webb/coredns}
pause_cache=${WEBB_PAUSE_CACHE:-/var/cache/webb/pause}
kube_out=$kube_cache/$kube_release
coredns_out=$coredns_cache/$coredns_release
pause_hash=$(cat "$here/pause/go.mod" "$here/pause/main.go" | sha256sum | cut -c1-16)
pause_out=$pause_cache/$pause_hash
node_bins=(kubelet kube-controller-manager kube-scheduler)

export GOMODCACHE=$kube_cache/gomod GOCACHE=$kube_cache/gocache GOTOOLCHAIN=local \
  GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
jobs=${WEBB_KUBE_JOBS:-2}
summary=()

# kube-apiserver and kubectl first: that script replaces $kube_out whole when it builds, so it
# must never run after ours has put the node binaries there
bash "$repo/tests/kube/build-apiserver.sh" >/dev/null

# build_into OUT_DIR STAMP WHAT MODULE_DIR GO_BUILD_ARGS... : build in a staging dir, move each
# binary into OUT_DIR, record the wall time in OUT_DIR/STAMP
build_into() {
  local out=$1 stamp=$2 what=$3 moddir=$4; shift 4
  mkdir -p "$out"
  local staging start seconds
  staging=$(mktemp -d "$out/.build.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
  trap "rm -rf '$staging'" EXIT
  echo "cluster-build: building $what (cold: minutes)" >&2
  start=$(date +%s)
  (cd "$moddir" && nice -n 10 go build -p "$jobs" -trimpath -o "$staging/" "$@")
  seconds=$(( $(date +%s) - start ))
  for f in "$staging"/*; do mv -f "$f" "$out/"; done
  echo "$seconds" > "$out/$stamp"
  rm -rf "$staging"
  trap - EXIT
  summary+=("built $what in $seconds s -> $out")
}

have() { local d=$1; shift; for b in "$@"; do [[ -x $d/$b ]] || return 1; done; }

# ---- kubelet, kube-controller-manager, kube-scheduler
if ! have "$kube_out" "${node_bins[@]}"; then
  command -v go >/dev/null || { echo "cluster-build: go is not installed" >&2; exit 1; }
  exec 9>"$kube_cache/.lock"   # the lock of tests/kube/build-apiserver.sh: one kube build at a time
  flock 9
  if ! have "$kube_out" "${node_bins[@]}"; then
    # the version stamp Kubernetes' own build gives (kubelet reports it as the node's kubeletVersion)
    major=${kube_release#v}; major=${major%%.*}
    minor=${kube_release#v"$major".}; minor=${minor%%.*}
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$kube_release -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
      ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    build_into "$kube_out" node-build-seconds "${node_bins[*]} $kube_release" "$here" -ldflags "$ldflags" \
      "${node_bins[@]/#/k8s.io/kubernetes/cmd/}"
  fi
  exec 9>&-
else
  summary+=("kubelet, kube-controller-manager, kube-scheduler $kube_release: cached in $kube_out")
fi

# ---- CoreDNS (its own module graph; the same module and build caches)
if ! have "$coredns_out" coredns; then
  mkdir -p "$coredns_cache"
  exec 8>"$coredns_cache/.lock"
  flock 8
  if ! have "$coredns_out" coredns; then
    build_into "$coredns_out" build-seconds "coredns $coredns_release" "$here/coredns" \
      -ldflags "-s -w" github.com/coredns/coredns
  fi
  exec 8>&-
else
  summary+=("coredns $coredns_release: cached in $coredns_out")
fi

# ---- pause (a few seconds), keyed by its source
if ! have "$pause_out" pause; then
  build_into "$pause_out" build-seconds pause "$here/pause" -ldflags "-s -w" .
else
  summary+=("pause: cached in $pause_out")
fi

printf 'cluster-build: %s\n' "${summary[@]}" >&2
echo "kube=$kube_out"
echo "coredns=$coredns_out"
echo "pause=$pause_out"
