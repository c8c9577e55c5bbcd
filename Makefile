# Moat: the two set-up commands are `make demo` and `make test` (as root, on a fresh machine).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: bootstrap build test lint unit-test demo bench clean

bootstrap:
	bash scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --release --workspace --bins

lint: bootstrap
	$(CARGO) fmt --all --check
	cd ebpf-progs/moat-ebpf && $(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The whole suite: pure crates, BPF_PROG_TEST_RUN verdicts, real-kernel namespace traffic.
test: bootstrap lint
	$(CARGO) test --workspace --no-fail-fast

demo: build
	bash scripts/demo.sh

bench: build
	bash bench/run.sh

clean:
	$(CARGO) clean
	rm -rf bench/results.json bench/raw
