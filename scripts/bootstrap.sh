#!/usr/bin/env bash
# Installs everything the build, demo, tests and benchmarks need on a fresh
# Debian 12 machine of this project's kind. Idempotent: every step checks
# before it acts, so `make test` can call it on every run at little cost.
set -euo pipefail

log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  echo "bootstrap: must run as root (installs packages, mounts bpffs)" >&2
  exit 1
fi

# --- Debian packages -------------------------------------------------------
# containerd (with runc) is the CRI runtime of node-daemon/tests/containerd_cri.rs, which
# talks CRI itself: Debian 12 packages no crictl (cri-tools).
DEB_PACKAGES=(
  iproute2 iptables nftables conntrack ethtool jq
  containernetworking-plugins podman busybox-static containerd
  sockperf iperf3 bpftool tcpdump
  nmap hping3 dnsmasq-base
  shellcheck
)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Rust: the pinned nightly, rust-src, the static target, bpf-linker ------
# Every version comes from toolchain.env (the Dockerfile and datapath/build.rs read the
# same file), so the dev machine, CI (`make test` runs this) and the image build agree.
export PATH="$HOME/.cargo/bin:$PATH"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=SCRIPTDIR/../toolchain.env
. "$repo/toolchain.env"

if ! rustup toolchain list | grep -q "^${MOAT_NIGHTLY}-"; then
  log "installing $MOAT_NIGHTLY"
  rustup toolchain install "$MOAT_NIGHTLY" --profile minimal --component rust-src
fi
if ! rustup component list --toolchain "$MOAT_NIGHTLY" --installed | grep -q '^rust-src'; then
  log "adding rust-src to $MOAT_NIGHTLY"
  rustup component add rust-src --toolchain "$MOAT_NIGHTLY"
fi
# moat-cni and moat-ipam are built static for this target (scripts/build-static.sh) with the
# default (stable) toolchain; pure Rust, so no musl C toolchain is needed.
if ! rustup target list --installed | grep -qx "$MOAT_STATIC_TARGET"; then
  log "adding the $MOAT_STATIC_TARGET target"
  rustup target add "$MOAT_STATIC_TARGET"
fi

# bpf-linker must link the nightly's own LLVM (toolchain.md): the default
# features look for a system LLVM of another major version and fail. The
# binary finds libLLVM through the symlinks below (its RUNPATH), which always
# point into the pinned nightly, so an unpinned `nightly` can move freely.
# shellcheck disable=SC2012 # one glob match wanted; names are libLLVM.so.<n>
lib=$(ls "$(rustc +"$MOAT_NIGHTLY" --print sysroot)"/lib/libLLVM.so.* | head -1)
major=$(basename "$lib" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')
if [[ $major != "$BPF_LINKER_LLVM_MAJOR" ]]; then
  echo "bootstrap: $MOAT_NIGHTLY ships LLVM $major, toolchain.env says BPF_LINKER_LLVM_MAJOR=$BPF_LINKER_LLVM_MAJOR" >&2
  exit 1
fi
dir="$HOME/.local/share/bpf-linker-llvm/lib"
mkdir -p "$dir"
for link in "$dir/libLLVM.so" "$dir/$(basename "$lib")"; do
  [[ $(readlink "$link" 2>/dev/null) == "$lib" ]] || ln -sfn "$lib" "$link"
done
if [[ $(bpf-linker --version 2>/dev/null) != "bpf-linker $BPF_LINKER_VERSION" ]]; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM $major ($lib)"
  LLVM_PREFIX="${dir%/lib}" cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features "llvm-$major" --locked --force 2>&1 | tail -3 >&2
fi

# cargo-fuzz runs the fuzz targets in fuzz/ (scripts/fuzz.sh, make fuzz, make test's smoke
# run). Pinned to the version the targets were last run with; built with the pinned nightly
# that runs them.
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo +"$MOAT_NIGHTLY" install cargo-fuzz --version 0.13.2 --locked 2>&1 | tail -3 >&2
fi

# --- bpffs -----------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# --- podman with the CNI backend (issue 3 uses it as a real runtime) -------
mkdir -p /etc/containers/containers.conf.d
conf=/etc/containers/containers.conf.d/50-moat.conf
if [[ ! -f $conf ]]; then
  cat >"$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
CONF
fi

log "ok"
