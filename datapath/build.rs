//! Builds the eBPF crate (ebpf-progs/moat-ebpf) for the BPF target with the nightly toolchain
//! and bpf-linker, and leaves the object in OUT_DIR for `include_bytes!`. One `cargo build`
//! of the workspace therefore builds both sides. The nightly is the one pinned in the
//! repository's toolchain.env (`MOAT_NIGHTLY`), never the moving `nightly` channel, so every
//! machine builds the same object; `scripts/bootstrap.sh` installs it, rust-src and bpf-linker.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .join("../ebpf-progs/moat-ebpf")
        .canonicalize()?;
    let common_dir = manifest_dir
        .join("../ebpf-progs/moat-common")
        .canonicalize()?;
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        common_dir.join("src").display()
    );

    let toolchain_env = manifest_dir.join("../toolchain.env");
    println!("cargo:rerun-if-changed={}", toolchain_env.display());
    let nightly = pinned(&toolchain_env, "MOAT_NIGHTLY")?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // One eBPF build tree for every host build of this checkout (debug, release, the static
    // musl build, clippy and the fuzz crate each have their own OUT_DIR): the object depends
    // only on the eBPF sources and the pinned nightly, so the second build is a no-op instead
    // of another compile of `core` for the BPF target. Cargo's lock on that tree serialises
    // concurrent builds.
    let target_dir = manifest_dir.join("../target/ebpf");
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", &nightly, "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(ebpf_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The host build's compiler settings must not leak into the BPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd.output().with_context(|| {
        format!(
            "running `rustup run {nightly} cargo build` for moat-ebpf (run scripts/bootstrap.sh)"
        )
    })?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the eBPF programs with {nightly} failed; see the warnings above \
             (is it installed? run scripts/bootstrap.sh)"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/moat");
    std::fs::copy(&object, out_dir.join("moat.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}

/// `KEY`'s value in toolchain.env: shell `KEY=VALUE` lines, `#` comments, no quoting (the
/// file says so), so no shell is needed to read it.
fn pinned(file: &Path, key: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|line| line.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{} does not set {key}", file.display()))
}
