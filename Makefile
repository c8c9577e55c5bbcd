# Moat: the two set-up commands are `make demo` and `make test` (as root, on a fresh machine).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: bootstrap build static test lint unit-test demo bench clean fuzz fuzz-smoke
FUZZ_SECONDS ?= 600

bootstrap:
	bash scripts/bootstrap.sh

build: bootstrap static
	$(CARGO) build --release --workspace --bins

# moat-cni and moat-ipam as static (musl) executables: what the image ships and installs.
static: bootstrap
	bash scripts/build-static.sh

lint: bootstrap
	$(CARGO) fmt --all --check
	cd ebpf-progs/moat-ebpf && $(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The whole suite: pure crates, BPF_PROG_TEST_RUN verdicts, real-kernel namespace traffic.
test: bootstrap lint static
	$(CARGO) build --workspace --bins
	@mkdir -p target
	set -o pipefail; $(CARGO) test --workspace --no-fail-fast 2>&1 | tee target/test-output.log \
	  || { bash scripts/test-failures.sh target/test-output.log; exit 1; }
	BIN=target/debug bash scripts/demo.sh --check
	$(MAKE) fuzz-smoke

# Every cargo-fuzz target for about 10 s, built without a sanitizer or optimisation (quick to
# build); new
# inputs go to fuzz/target/corpus (ignored by git).
fuzz-smoke: bootstrap
	FUZZ_SANITIZER=none FUZZ_PROFILE=dev bash scripts/fuzz.sh 10

# The long run, with AddressSanitizer: FUZZ_SECONDS per target (make fuzz FUZZ_SECONDS=3600).
fuzz: bootstrap
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

demo: build
	bash scripts/demo.sh

bench: build
	bash bench/run.sh

clean:
	$(CARGO) clean
	rm -rf bench/results.json bench/raw

# The NetworkPolicy conformance cases (conformance/cases/netpol-cases.json) on this
# node: pure engine, then real pods + moatd + datapath through per-pod Services, direct, and
# through Services whose every backend is on a second node (two node namespaces); then the
# translated upstream ClusterNetworkPolicy cases (conformance/cases/cnp-cases.json) the same
# four ways and direct over IPv6.
.PHONY: conformance
conformance: build
	@rc=0; \
	./target/release/moat-conformance --offline --report target/conformance-offline.json || rc=1; \
	./target/release/moat-conformance --report target/conformance-services.json || rc=1; \
	./target/release/moat-conformance --direct --report target/conformance-direct.json || rc=1; \
	./target/release/moat-conformance --remote-backends --report target/conformance-remote.json || rc=1; \
	cnp=conformance/cases/cnp-cases.json; \
	./target/release/moat-conformance --cases $$cnp --offline --report target/cnp-offline.json || rc=1; \
	./target/release/moat-conformance --cases $$cnp --report target/cnp-services.json || rc=1; \
	./target/release/moat-conformance --cases $$cnp --direct --report target/cnp-direct.json || rc=1; \
	./target/release/moat-conformance --cases $$cnp --direct --ipv6 --report target/cnp-direct-v6.json || rc=1; \
	./target/release/moat-conformance --cases $$cnp --remote-backends --report target/cnp-remote.json || rc=1; \
	exit $$rc
