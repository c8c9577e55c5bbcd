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
DEB_PACKAGES=(
  iproute2 iptables nftables conntrack ethtool jq
  containernetworking-plugins podman busybox-static
  sockperf iperf3 bpftool tcpdump
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

# --- Rust: nightly rust-src and bpf-linker ---------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker must link the nightly's own LLVM (toolchain.md): the default
# features look for a system LLVM of another major version and fail.
if ! bpf-linker --version >/dev/null 2>&1; then
  # shellcheck disable=SC2012 # one glob match wanted; names are libLLVM.so.<n>
  lib=$(ls "$(rustc +nightly --print sysroot)"/lib/libLLVM.so.* | head -1)
  major=$(basename "$lib" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')
  dir="$HOME/.local/share/bpf-linker-llvm/lib"
  mkdir -p "$dir"
  ln -sf "$lib" "$dir/libLLVM.so"
  ln -sf "$lib" "$dir/$(basename "$lib")"
  log "building bpf-linker against LLVM $major ($lib)"
  LLVM_PREFIX="${dir%/lib}" cargo install bpf-linker --version 0.13.0 \
    --no-default-features --features "llvm-$major" --locked 2>&1 | tail -3 >&2
fi

# cargo-fuzz runs the fuzz targets in fuzz/ (scripts/fuzz.sh, make fuzz, make test's smoke
# run). Pinned to the version the targets were last run with; built with the nightly that
# runs them.
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo +nightly install cargo-fuzz --version 0.13.2 --locked 2>&1 | tail -3 >&2
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
