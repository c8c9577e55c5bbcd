# syntax=docker/dockerfile:1
#
# Moat's node image: moatd, moatctl, moat-cni and moat-ipam (plus moat-conformance,
# which kind-tests/conformance.sh copies out when the host has no Rust toolchain).
#
#   docker build -t moat:dev .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.
# The DaemonSet (manifests/daemonset.yaml) runs moatd from this image; its
# install-cni init container copies moat-cni and moat-ipam from /opt/moat/bin
# onto each node's /opt/cni/bin, so the CNI binaries run on the node's own
# userland: they are built static (musl, scripts/build-static.sh) and need no
# libc on the node, whatever its distribution or glibc version.
#
# Toolchain versions (the nightly, bpf-linker, the static target) come from
# toolchain.env, the same file scripts/bootstrap.sh and datapath/build.rs read.

############################################################################
# Builder: the same toolchain scripts/bootstrap.sh sets up on a dev machine.
############################################################################
FROM rust:1.95-bookworm AS builder

ENV CARGO_TERM_COLOR=never \
    CARGO_NET_RETRY=5

# The pins, copied on their own so that the toolchain layers below are cached
# until toolchain.env itself changes. Every RUN that needs a version sources it.
COPY toolchain.env /etc/moat/toolchain.env

# --- the pinned nightly + rust-src, the static target (as in bootstrap.sh) --
# The eBPF programs build with the pinned nightly (datapath/build.rs runs
# `rustup run $MOAT_NIGHTLY cargo build -Z build-std=core`).
RUN set -eux; \
    . /etc/moat/toolchain.env; \
    rustup toolchain install "$MOAT_NIGHTLY" --profile minimal --component rust-src; \
    rustup target add "$MOAT_STATIC_TARGET"

# --- bpf-linker linked against the nightly's own LLVM ----------------------
# Exactly bootstrap.sh's recipe: the default features look for a system LLVM
# of another major version and fail. The binary's RUNPATH points at
# $HOME/.local/share/bpf-linker-llvm/lib, which stays in this stage.
RUN set -eux; \
    . /etc/moat/toolchain.env; \
    lib="$(ls "$(rustc +"$MOAT_NIGHTLY" --print sysroot)"/lib/libLLVM.so.* | head -1)"; \
    major="$(basename "$lib" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')"; \
    test "$major" = "$BPF_LINKER_LLVM_MAJOR"; \
    dir="$HOME/.local/share/bpf-linker-llvm/lib"; \
    mkdir -p "$dir"; \
    ln -sf "$lib" "$dir/libLLVM.so"; \
    ln -sf "$lib" "$dir/$(basename "$lib")"; \
    LLVM_PREFIX="${dir%/lib}" cargo install bpf-linker --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features "llvm-${major}" --locked; \
    bpf-linker --version

# --- the workspace ---------------------------------------------------------
WORKDIR /src
COPY . .

# One `cargo build` builds both sides: datapath/build.rs compiles the eBPF
# crate with the pinned nightly and embeds the object. moat-cni and moat-ipam
# run on the node, not in this image: they come from the static (musl) build,
# and the glibc build skips them. target/ and the registry are cache mounts
# (fast rebuilds), so the binaries are copied out in the same step.
RUN --mount=type=cache,id=moat-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=moat-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=moat-target,target=/src/target \
    set -eux; \
    cargo build --release --workspace --bins --locked --exclude moat-cni --exclude moat-ipam; \
    static="$(scripts/build-static.sh --locked)"; \
    mkdir -p /out; \
    for b in moatd moatctl moat-conformance; do \
      install -m 0755 "target/release/$b" "/out/$b"; \
    done; \
    for b in moat-cni moat-ipam; do \
      install -m 0755 "$static/$b" "/out/$b"; \
    done

############################################################################
# Runtime
############################################################################
FROM debian:bookworm-slim

# iproute2: `ip link/route/netns` for troubleshooting inside the pod.
# nftables: moatd writes its masquerade table (inet moat-masquerade) with nft.
# iptables: moatd's after-DNAT chain (MOAT-AFTER-DNAT in the mangle table) and
# `moatctl trace` to Service addresses (iptables-save). Debian's iptables is the nf_tables
# variant, as on kind's nodes and most current distributions.
# ca-certificates: TLS roots (the API server's CA comes from the service
# account, but anything else moatd may talk to needs them).
# util-linux (mount, mountpoint) is part of the base image; the DaemonSet's
# init container uses it to mount bpffs.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      iproute2 nftables iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# /opt/moat/bin is where the DaemonSet's install-cni init container copies moat-cni and
# moat-ipam from (moatd --install-cni-from reads it too);
# /usr/local/bin puts moatd and moatctl on PATH for `kubectl exec`.
COPY --from=builder /out/ /opt/moat/bin/
RUN for b in moatd moatctl moat-cni moat-ipam; do \
      ln -s "/opt/moat/bin/$b" "/usr/local/bin/$b"; \
    done

LABEL org.opencontainers.image.title="moat" \
      org.opencontainers.image.description="Moat: Kubernetes CNI with eBPF-enforced NetworkPolicy (moatd, moatctl, moat-cni, moat-ipam)" \
      org.opencontainers.image.licenses="Apache-2.0"

# moatd needs root plus BPF/NET_ADMIN/SYS_ADMIN/PERFMON; the DaemonSet grants
# exactly those. Running the image elsewhere without them fails at load time.
ENTRYPOINT ["/usr/local/bin/moatd"]
CMD ["--help"]
