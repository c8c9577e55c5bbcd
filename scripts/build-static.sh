#!/usr/bin/env bash
# Builds moat-cni and moat-ipam as static executables for MOAT_STATIC_TARGET (toolchain.env,
# x86_64-unknown-linux-musl): the runtime runs them on the node's own userland, which may
# have an older glibc than the build machine, or musl, or no libc at all.
#
#   scripts/build-static.sh [cargo build flags...]     e.g. --locked (the Dockerfile)
#
# Output: target/<MOAT_STATIC_TARGET>/release/{moat-cni,moat-ipam}, the copies the image
# ships and node-daemon/tests/static_cni_install.rs installs and runs.
#
# Both crates are pure Rust (no C dependency), so the musl target's bundled crt and libc
# (rustup's self-contained linking) are all that is needed: no musl-gcc. crt-static is the
# musl target's default; it is spelled out so that a RUSTFLAGS elsewhere cannot turn it off.
# datapath/build.rs still builds the eBPF object with the pinned nightly for moat-cni, as for
# any build; moat-ipam needs only moat-cni-protocol, not the datapath.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/../toolchain.env
. "$repo/toolchain.env"
export PATH="$HOME/.cargo/bin:$PATH"

triple_var="$(tr 'a-z-' 'A-Z_' <<<"$MOAT_STATIC_TARGET")"
export "CARGO_TARGET_${triple_var}_RUSTFLAGS=-C target-feature=+crt-static"

cd "$repo"
cargo build --release --target "$MOAT_STATIC_TARGET" -p moat-cni -p moat-ipam --bins "$@"

out="${CARGO_TARGET_DIR:-$repo/target}/$MOAT_STATIC_TARGET/release"
for b in moat-cni moat-ipam; do
  # A dynamically linked result would defeat the point: refuse it here rather than on a node.
  if LC_ALL=C readelf -lW "$out/$b" | grep -q 'Requesting program interpreter'; then
    echo "build-static: $out/$b has a program interpreter (not static)" >&2
    exit 1
  fi
done
echo "$out"
