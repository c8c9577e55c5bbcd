//! The CNI binaries the install step puts on a node are static: moat-cni and moat-ipam from
//! the musl build (scripts/build-static.sh, the copies the image ships in /opt/moat/bin) go
//! through `install::install_binaries` (what `moatd --install-cni-from` runs; the DaemonSet's
//! install-cni init container does the same copy-and-rename) into a temporary host
//! /opt/cni/bin, and the installed copies have no program interpreter and no DT_NEEDED
//! library, answer `CNI_COMMAND=VERSION` run from there, and still answer in a chroot holding
//! nothing but the binary (no libc, no loader, no /proc). moatd, a glibc build, goes through
//! the same checks as a control: they tell it apart.
//!
//! The musl build is not part of `cargo test` (it builds the crates a second time for another
//! target): without it this test says so and passes; `make test` builds it first.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use moatd::install;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `key` from toolchain.env (KEY=VALUE lines).
fn pinned(key: &str) -> String {
    let text = fs::read_to_string(repo().join("toolchain.env")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| panic!("toolchain.env has no {key}"))
}

/// The target directory this test was built in (moatd lives in `<target>/debug`), so a
/// CARGO_TARGET_DIR elsewhere is followed.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_moatd"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

/// Where scripts/build-static.sh leaves the static binaries (MOAT_STATIC_BIN_DIR overrides).
fn static_dir() -> PathBuf {
    match std::env::var_os("MOAT_STATIC_BIN_DIR") {
        Some(dir) => dir.into(),
        None => target_dir()
            .join(pinned("MOAT_STATIC_TARGET"))
            .join("release"),
    }
}

/// How an ELF executable is linked: a PT_INTERP (the dynamic loader the kernel must map
/// first) and the DT_NEEDED entries of its dynamic section (libraries the loader must find).
/// A static-pie has a dynamic section (for its own relocations) but neither of these.
#[derive(Debug, PartialEq)]
struct Linkage {
    interpreter: Option<String>,
    needed: usize,
}

fn linkage(elf: &[u8]) -> Linkage {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "not a 64-bit little-endian ELF");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NULL: usize = 0;
    const DT_NEEDED: usize = 1;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let mut found = Linkage {
        interpreter: None,
        needed: 0,
    };
    for ph in (0..phnum).map(|i| phoff + i * phentsize) {
        // Elf64_Phdr: p_type at 0, p_offset at 8, p_filesz at 32.
        let (offset, size) = (u64_at(ph + 8), u64_at(ph + 32));
        match u32_at(ph) {
            PT_INTERP => {
                let path = &elf[offset..offset + size];
                found.interpreter =
                    Some(String::from_utf8_lossy(path).trim_end_matches('\0').into());
            }
            PT_DYNAMIC => {
                // Elf64_Dyn: d_tag, d_val; 16 bytes each, up to DT_NULL.
                for entry in (offset..offset + size).step_by(16) {
                    match u64_at(entry) {
                        DT_NULL => break,
                        DT_NEEDED => found.needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    found
}

/// `CNI_COMMAND=VERSION` with nothing else in the environment, a 1.0.0 request on stdin.
fn cni_version(mut cmd: Command) -> Output {
    let mut child = cmd
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"cniVersion":"1.0.0"}"#)
        .unwrap();
    child.wait_with_output().unwrap()
}

fn assert_version_answer(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(answer["cniVersion"], "1.0.0", "{what}: {answer}");
    let supported = answer["supportedVersions"].as_array().unwrap();
    assert!(supported.contains(&"1.0.0".into()), "{what}: {answer}");
}

/// Runs `/<name>` in a chroot of `root` (a directory holding only that file).
fn in_empty_chroot(root: &Path, name: &str) -> Output {
    // Found on this process's PATH: the child's environment is cleared, PATH included.
    let chroot = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("chroot"))
        .chain([PathBuf::from("/usr/sbin/chroot")])
        .find(|p| p.is_file())
        .expect("chroot(8) not found");
    let mut cmd = Command::new(chroot);
    cmd.arg(root).arg(format!("/{name}"));
    cni_version(cmd)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn installed_cni_binaries_are_static_and_run_without_any_libc() {
    let from = static_dir();
    if !["moat-cni", "moat-ipam"]
        .iter()
        .all(|b| from.join(b).is_file())
    {
        // Only the absence of the musl build skips this; `make test` builds it first.
        eprintln!(
            "SKIPPED installed_cni_binaries_are_static_and_run_without_any_libc: no static \
             moat-cni/moat-ipam in {} (run scripts/build-static.sh)",
            from.display()
        );
        return;
    }

    let host = tempfile::tempdir().unwrap();
    let bin_dir = host.path().join("opt/cni/bin");
    install::install_binaries(&from, &bin_dir).unwrap();

    for name in ["moat-cni", "moat-ipam"] {
        let installed = bin_dir.join(name);
        let bytes = fs::read(&installed).unwrap();
        assert_eq!(
            bytes,
            fs::read(from.join(name)).unwrap(),
            "{name}: installed copy differs"
        );
        let mode = fs::metadata(&installed).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{name}: mode {mode:o}");
        assert_eq!(
            linkage(&bytes),
            Linkage {
                interpreter: None,
                needed: 0
            },
            "{name} is not static"
        );
        if let Ok(out) = Command::new("file").arg("-b").arg(&installed).output() {
            // For the log: what `file` calls it ("static-pie linked" / "statically linked").
            eprintln!("{name}: {}", String::from_utf8_lossy(&out.stdout).trim());
        }

        // The installed copy, run in the install directory as a runtime would find it (by
        // absolute path: std leaves a relative one with current_dir platform-defined).
        let mut cmd = Command::new(&installed);
        cmd.current_dir(&bin_dir);
        assert_version_answer(&format!("installed {name}"), &cni_version(cmd));

        if is_root() {
            let root = tempfile::tempdir().unwrap();
            fs::copy(&installed, root.path().join(name)).unwrap();
            assert_version_answer(
                &format!("{name} in an empty chroot"),
                &in_empty_chroot(root.path(), name),
            );
        } else {
            eprintln!("{name}: not root, the empty-chroot run is left out (chroot needs root)");
        }
    }

    // Control: a glibc build fails both checks, so passing them means something.
    let moatd = Path::new(env!("CARGO_BIN_EXE_moatd"));
    let control = linkage(&fs::read(moatd).unwrap());
    assert!(
        control.interpreter.is_some() && control.needed > 0,
        "moatd (glibc) should look dynamic: {control:?}"
    );
    if is_root() {
        let root = tempfile::tempdir().unwrap();
        fs::copy(moatd, root.path().join("moatd")).unwrap();
        let out = in_empty_chroot(root.path(), "moatd");
        assert!(
            !out.status.success(),
            "a dynamic moatd ran in an empty chroot"
        );
    }
}
