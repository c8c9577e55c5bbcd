#!/usr/bin/env bash
# The local demo: real pods (network namespaces) on this kernel with Moat's datapath.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -q -p moat-datapath --example demo
