//! Builds the eBPF crate (ebpf-progs/moat-ebpf) for the BPF target with the nightly toolchain
//! and bpf-linker, and leaves the object in OUT_DIR for `include_bytes!`. One `cargo build`
//! of the workspace therefore builds both sides. `scripts/bootstrap.sh` installs the nightly,
//! rust-src and bpf-linker this needs.
use std::{env, path::PathBuf, process::Command};

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

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
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
    let output = cmd.output().context(
        "running `rustup run nightly cargo build` for moat-ebpf (run scripts/bootstrap.sh)",
    )?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!("building the eBPF programs failed; see the warnings above");
    }
    let object = target_dir.join("bpfel-unknown-none/release/moat");
    std::fs::copy(&object, out_dir.join("moat.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
