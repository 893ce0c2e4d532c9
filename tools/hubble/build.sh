#!/usr/bin/env bash
# Hubble's API for `webb hubble serve`, and the hubble CLI that tests it, both from the
# github.com/cilium/cilium Go module whose release tools/hubble/go.mod pins. Nothing is copied
# into the repo: the module is fetched by `go mod download` into a cache outside it.
#
#   build.sh api   the Python stubs of api/v1/{flow,relay,observer}/*.proto (protoc of grpcio-tools)
#                  into build/hubble_api/ (gitignored), a package `hubble_api` whose modules import
#                  each other as hubble_api.flow.flow_pb2 ... (protoc writes `from flow import ...`; a
#                  top-level `flow` would clash with anything of that name). Instant when already made
#                  for this release and this grpcio-tools. Prints the directory.
#   build.sh cli   the hubble CLI (go build github.com/cilium/cilium/hubble), once per release, into
#                  /var/cache/webb/hubble/<release>/hubble (cold: minutes). Prints the binary's path.
#
#   WEBB_HUBBLE_CACHE  cache root (default /var/cache/webb/hubble): <release>/, gomod/, gocache/
#   WEBB_HUBBLE_JOBS   go build -p (default 2: the machine has 2 cores and is shared)
#   PYTHON             the interpreter whose grpc_tools runs protoc (default python3)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
release=$(sed -nE 's#^(require)?[[:space:]]*github\.com/cilium/cilium (v[0-9.]+)( .*)?$#\2#p' "$here/go.mod" | head -n1)
[[ -n $release ]] || { echo "hubble-build: no github.com/cilium/cilium release in $here/go.mod" >&2; exit 1; }
cache=${WEBB_HUBBLE_CACHE:-/var/cache/webb/hubble}
out=$cache/$release
python=${PYTHON:-python3}
export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache GOTOOLCHAIN=local \
  GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

need_go() { command -v go >/dev/null || { echo "hubble-build: go is not installed" >&2; exit 1; }; }

lock() {  # one build at a time: another checkout may be building the same release
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
}

api() {
  local dest=$repo/build/hubble_api tools stamp
  tools=$("$python" -c 'import grpc_tools, importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null) || {
    echo "hubble-build: grpcio-tools is not installed (pip install grpcio-tools; it is in the test extras)" >&2; exit 1; }
  stamp="cilium $release, grpcio-tools $tools"
  if [[ -f $dest/STAMP && $(cat "$dest/STAMP") == "$stamp" ]]; then
    echo "$dest"
    return
  fi
  need_go
  lock
  local mod
  mod=$(cd "$here" && go mod download -json github.com/cilium/cilium | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p')
  [[ -d $mod/api/v1/observer ]] || { echo "hubble-build: github.com/cilium/cilium $release has no api/v1/observer" >&2; exit 1; }
  mkdir -p "$repo/build"
  local staging
  staging=$(mktemp -d "$repo/build/.hubble_api.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
  trap "rm -rf '$staging'" EXIT
  local wkt
  wkt=$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
  (cd "$mod/api/v1" && "$python" -m grpc_tools.protoc -I . -I "$wkt" --python_out="$staging" --pyi_out="$staging" \
    --grpc_python_out="$staging" flow/flow.proto relay/relay.proto observer/observer.proto)
  for pkg in flow relay observer; do : > "$staging/$pkg/__init__.py"; done
  # `from flow import flow_pb2` -> `from hubble_api.flow import flow_pb2`, `from flow.flow_pb2 import *` (import
  # public) -> `from hubble_api.flow.flow_pb2 import *`; and relay, observer
  sed -i -E 's/^from (flow|relay|observer)( import |\.)/from hubble_api.\1\2/' "$staging"/*/*.py "$staging"/*/*.pyi
  echo '"""Hubble'"'"'s API (github.com/cilium/cilium '"$release"' api/v1), made by tools/hubble/build.sh api."""' \
    > "$staging/__init__.py"
  echo "$stamp" > "$staging/STAMP"
  rm -rf "$dest"
  mv "$staging" "$dest"
  trap - EXIT
  echo "hubble-build: made the Hubble API stubs ($stamp) in $dest" >&2
  echo "$dest"
}

cli() {
  if [[ -x $out/hubble ]]; then
    echo "hubble-build: hubble $release already built (cold build took $(cat "$out/build-seconds" 2>/dev/null || echo '?') s)" >&2
    echo "$out/hubble"
    return
  fi
  need_go
  lock
  if [[ -x $out/hubble ]]; then echo "$out/hubble"; return; fi
  local staging start seconds
  mkdir -p "$cache"
  staging=$(mktemp -d "$cache/.build-$release.XXXXXX")
  chmod 755 "$staging"
  # shellcheck disable=SC2064
  trap "rm -rf '$staging'" EXIT
  echo "hubble-build: building hubble $release (cold: a few minutes)" >&2
  start=$(date +%s)
  # what hubble's own Makefile stamps on a release build (hubble version)
  (cd "$here" && nice -n 10 go build -p "${WEBB_HUBBLE_JOBS:-2}" -trimpath \
    -ldflags "-s -w -X github.com/cilium/cilium/hubble/pkg.Version=$release" \
    -o "$staging/hubble" github.com/cilium/cilium/hubble)
  seconds=$(( $(date +%s) - start ))
  echo "$seconds" > "$staging/build-seconds"
  rm -rf "$out"
  mv "$staging" "$out"
  trap - EXIT
  echo "hubble-build: built hubble $release in $seconds s into $out" >&2
  echo "$out/hubble"
}

case ${1:-} in
  api) api ;;
  cli) cli ;;
  *) echo "usage: $0 api|cli" >&2; exit 2 ;;
esac
